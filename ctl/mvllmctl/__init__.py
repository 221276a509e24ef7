"""mvllmctl: the command line of mvllmd."""
