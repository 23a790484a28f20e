"""One module per wire format (OpenAI, Anthropic, Azure, Bedrock, Vertex, TGI, Cloudflare, embeddings,
...). A module that serves routes registers its builder with `app.api.adapter.adapter`; the server
finds them all through `build_adapters`. Helpers shared by several formats (OpenAI's request models,
AWS event-stream framing) live here too and register nothing."""
