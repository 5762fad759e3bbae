"""The one error type users see: a ValueError that names the field and quotes the numbers."""


class SpecError(ValueError):
    """Bad input (model, cluster, workload or plan). The CLI prints it on one line."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise SpecError(field, message)
