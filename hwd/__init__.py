"""The store hardware daemon (the hwd issue)."""
