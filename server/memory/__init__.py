"""The server's part of conversation memory, on top of `moshi_ttt`'s store and memory files: on the web side
`memories` (tokens, the sealed store, a conversation's saves and restore; torch-free), on the model side
`slot_memory` (a slot's fast weights to and from memory file bytes, between two steps; imports torch)."""
