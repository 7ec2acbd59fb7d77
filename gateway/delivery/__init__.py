"""What happens after a task ends.

    archive   copies finished videos into the archive, serves them, forgets them
    storage   the archive's backends: a directory, or an S3-compatible bucket (obstore)
    webhooks  signed event deliveries through the outbox, with retries
    content   streaming result files from TokenHub to clients, with Range

May import: store, policy and the shared nouns; not upstream, openai or simulator.
"""
