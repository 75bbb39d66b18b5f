"""A worker that fails under torch's own ``@record`` (torch's error-file writer)."""

from torch.distributed.elastic.multiprocessing.errors import record


@record
def main() -> None:
    raise RuntimeError("torch recorded this")


if __name__ == "__main__":
    main()
