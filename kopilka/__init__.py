"""Kopilka: a loyalty-points ledger for retail chains."""
