"""A real OpenID provider for the tests: oidc-provider-mock (PyPI) on
127.0.0.1 with a port of its own.

Prints `listening on PORT` once it serves, then runs until its stdin closes
(the test that started it ended) or it is killed. Users and their claims
are set over HTTP: `PUT /users/<sub>` with a JSON object of claims.
"""

import sys
import warnings

warnings.filterwarnings("ignore")

import oidc_provider_mock  # noqa: E402


def main() -> None:
    with oidc_provider_mock.run_server_in_thread(port=0, require_nonce=True) as server:
        print(f"listening on {server.server_port}", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
