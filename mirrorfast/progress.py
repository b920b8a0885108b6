"""Progress bars on stderr (tqdm) for long work, and none at all when they are off: a disabled tqdm still
makes a multiprocessing lock, which fixes the process's start method (an application's later
multiprocessing.set_start_method("spawn") then fails)."""


class _NoBar:
    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, unit: str, show: bool):
    """A tqdm bar of `total` `unit`s (update, set_postfix, close; a context manager), or one that does nothing."""
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True)
