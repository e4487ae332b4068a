"""gRPC services (the server issue)."""
