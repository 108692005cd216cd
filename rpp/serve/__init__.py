"""Serving a trained run: the HTTP service (`rpp serve`, rpp.serve.app) and batch personalization of a user file
(`rpp personalize`, rpp.serve.batch), both over ``PromptPolicy.personalize_many`` (rpp.agents.serving).
See docs/serving.md."""
