"""The demo job (`python -m zeroshard.train`): a small GPT on a synthetic language. Its model
and data live here, not among the library's modules."""

__all__: list[str] = []
