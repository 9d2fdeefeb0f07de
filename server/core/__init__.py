"""What every room of the server shares, torch-free and aiohttp-free: the server's validated configuration
(`config.ServeConfig`), the engine interface (`engine_api`), the events the engine sends a conversation
(`events`), why a conversation is refused or ends (`reasons`) and starting a thread that reports when it serves
(`threads`). Imports nothing else of the server."""
