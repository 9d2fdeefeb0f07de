"""The spoken-memory benchmark: spoken conversations with facts asked back later, and their recall scorer."""
