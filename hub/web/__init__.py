"""The HTTP faces: views that turn a request into calls to the services and their results into
JSON. The only layer (with the dashboard) that reads Flask's request."""
