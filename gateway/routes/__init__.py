"""HTTP routes: thin handlers that wire the request path's steps together."""
