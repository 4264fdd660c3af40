"""What a provider says when a message did not go."""


class SendFailed(Exception):
    """The message was not handed over.  `permanent`: the provider refused it for good (a bad number or
    address): it is marked failed; otherwise it is tried again later."""

    def __init__(self, reason, permanent=False):
        super().__init__(reason)
        self.permanent = permanent
