"""The OpenAI-compatible server: protocol models, the engine loop, metrics, routes, `idlm serve`."""
