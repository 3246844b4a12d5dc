"""What a rebuild may reuse from the previous site: the status file, its schema and the keys."""

from reportgen.cache.status import (  # noqa: F401
    STATUS_FILE,
    Status,
    image_key,
    read_status,
    reuse,
    reuse_file,
    settings_key,
)
