"""An OpenAI-compatible HTTP server for a run's adapter on its base model.

Endpoints (the subset of the OpenAI API that chat clients and judges use):

* ``GET /v1/models`` and ``GET /v1/models/{id}`` — the one served model; ``GET /health``.
* ``POST /v1/chat/completions`` — ``messages`` (system/user/assistant, content as a string or
  a list of text parts), ``max_tokens`` (or ``max_completion_tokens``), ``temperature``
  (0 = greedy), ``top_p``, ``seed``, ``stop``, ``n`` (1 only), ``logprobs``/``top_logprobs``
  and ``stream`` (server-sent events ending with ``data: [DONE]``; with
  ``stream_options.include_usage`` a last chunk carries ``usage``).
* ``POST /v1/completions`` — legacy text completion of a raw ``prompt`` string (no chat
  template): the same sampling fields, ``stream``, and ``logprobs`` as an int 0..5.

Other OpenAI fields are accepted and ignored. Every refusal is JSON in OpenAI's error shape
(400 bad field, 401 API key, 404, 405 method, 408 slow body, 411/413 body length, 429 busy,
500, 501 unknown method).

Concurrency policy: a thread per connection (listen backlog 128), so ``/v1/models``, errors
and waiting clients never block each other; the model generates **one request at a time**,
and at most ``max_waiting`` requests (``--max-queue``) wait for it in FIFO order; one more gets
429 with ``Retry-After``. Between two tokens the server checks the client's socket: a client
that disconnects (while waiting or generating, streamed or not) stops its generation at once.
Each request samples from its own ``torch.Generator`` seeded with ``seed`` (default 0), so a
seeded completion is the same whatever else runs. Reads and writes time out after
``io_timeout`` seconds (``--timeout``). Built on the standard library: no extra dependency.
"""

from fedtune.serving.api import GenRequest, RequestError, cut_at_stop, parse_completion, parse_request
from fedtune.serving.engine import ChatModel, load_chat_model, pick_token
from fedtune.serving.server import MAX_BODY, ChatServer, check_listen, is_loopback

__all__ = ["ChatModel", "ChatServer", "GenRequest", "MAX_BODY", "RequestError", "check_listen", "cut_at_stop",
           "is_loopback", "load_chat_model", "parse_completion", "parse_request", "pick_token"]
