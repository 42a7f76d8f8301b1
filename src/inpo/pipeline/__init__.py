"""The INPO iteration pipeline: resumable stages that hand off through files (``inpo run``)."""
