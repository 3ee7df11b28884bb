"""The web service: a FastAPI app over one checkpoint and, optionally, one index (`clipforge serve`).

Layout: settings -> main.create_app (lifespan loads the model and index) -> routers per resource;
batching coalesces encodes; errors, middleware, metrics and logs are cross-cutting. Never imports training.
"""
