"""Knowledge-conflict examples: the schema, the format table, the loaders and the row checks.

Four input formats (:data:`~.formats.FORMATS`) are read into one :class:`~.example.ConflictExample`:
generic JSONL (the project's own format, also the shipped set), CounterFact (EasyEdit layout),
MemoTrap JSONL and KRE JSON. :mod:`.contexts` builds contexts of other shapes from the same rows.
"""

from .example import ConflictExample, DataError, LoadedData, Task
from .formats import FORMAT_CHOICES, FORMATS, DataFormat, data_format, detect_format
from .loading import SHIPPED, SHIPPED_SET, check_prompt_lengths, data_path, load_examples, read_rows, shipped_conflicts_path
from .parsers import renderer

__all__ = ["FORMATS", "FORMAT_CHOICES", "SHIPPED", "SHIPPED_SET", "ConflictExample", "DataError", "DataFormat",
           "LoadedData", "Task", "check_prompt_lengths", "data_format", "data_path", "detect_format",
           "load_examples", "read_rows", "renderer", "shipped_conflicts_path"]
