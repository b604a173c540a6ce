"""Dataset yamls (COCO, COCO-seg) and the embedded offline dataset generator."""
__all__ = ["ensure_embedded_dataset"]


def __getattr__(name):
    # imported lazily so `python -m data.embedded` does not find the module already loaded by its package
    if name == "ensure_embedded_dataset":
        from .embedded import ensure_embedded_dataset

        return ensure_embedded_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
