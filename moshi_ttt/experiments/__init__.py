"""Research experiments run from the repository (`make experiment`): the memory-beyond-the-window study."""
