"""Shared test settings: small hypothesis budgets so the suite stays fast."""

from hypothesis import settings

settings.register_profile("normjax", max_examples=25, deadline=None)
settings.load_profile("normjax")
