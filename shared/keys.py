"""The names of a job's keys in Redis, in one place: the job store, the fair-share scripts and the
webhook deliveries all address a job's keys by them."""

JOB_PREFIX = "t2i:job:"


def job_key(job_id: str) -> str:
    """The job's record (a hash); the job's other keys start with it and a colon."""
    return JOB_PREFIX + job_id
