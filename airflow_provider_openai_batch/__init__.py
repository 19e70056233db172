"""Apache Airflow provider for cancelling OpenAI Batch API jobs and collecting their partial results."""

__version__ = "0.1.0"
