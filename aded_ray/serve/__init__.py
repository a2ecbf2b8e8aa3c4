"""Ray Serve application: OpenAI-style HTTP and Python handles over the engine."""
