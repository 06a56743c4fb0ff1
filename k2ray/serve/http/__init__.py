"""The HTTP edge: the router ingress, request limits, prompt preparation, generation, SSE and errors."""
