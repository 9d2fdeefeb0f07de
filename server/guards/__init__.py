"""What a client may do before and while it talks to the server: who may connect (`access`), per-address
admission at the upgrade (`admission`), limits on raw HTTP connections (`http_guard`) and per-connection
budgets (`limits`). Torch-free; imports only `core` of the server."""
