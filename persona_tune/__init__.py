"""persona-tune: fine-tuned small-language-model user agents from rating logs, on torchtune."""

__version__ = "0.1.0"
