"""Server side: aggregation strategies (pure tensor math) and client sampling."""
