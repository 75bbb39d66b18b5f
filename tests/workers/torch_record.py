"""A worker that fails under torch's own ``@record`` (torch's error-file writer)."""

from torch.distributed.elastic.multiprocessing.errors import record


# torch is left untyped when it is not installed (pyproject.toml, [tool.mypy]); installed,
# its @record is typed and the ignore is unused.
@record  # type: ignore[untyped-decorator, unused-ignore]
def main() -> None:
    raise RuntimeError("torch recorded this")


if __name__ == "__main__":
    main()
