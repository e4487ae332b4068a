"""Tests that try to break the whole system the way production will: kills,
contention, hostile input, full disks. Quick versions run in `make test`;
`make torture` runs the long ones (KOPILKA_TORTURE=long)."""
