"""The test app as a module, for `tidings run tests.gateway.run_app:app --gateway`."""

from tests.gateway.conftest import gateway_app

app = gateway_app()
