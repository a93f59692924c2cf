"""The HTTP gateway: routes, validation and error mapping. Never imports torch."""
