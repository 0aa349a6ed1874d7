"""The test servers live in the hub package (``hub.testing_servers``), where a connector's
own package can reach them too; this name stays for the tests and benchmarks that import it."""

from hub.testing_servers import FakeOpenAI, Receiver, Recorded, Reply

__all__ = ["FakeOpenAI", "Recorded", "Receiver", "Reply"]
