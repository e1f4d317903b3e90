"""Library side: kronpeft inside other libraries' APIs (`integrations.trainer`: `transformers.Trainer`)."""
