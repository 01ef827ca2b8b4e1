"""Checks of SPEC §5 that schemathesis does not know: every 4xx answer of
the admin API has a JSON body with a "message" string."""
import schemathesis


@schemathesis.check
def admin_error_shape(ctx, response, case):
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = response.json()
    except Exception as e:  # noqa: BLE001 - any non-JSON body fails the check
        raise AssertionError(f"a {response.status_code} answer without a JSON body: {response.text[:200]!r}") from e
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        raise AssertionError(f"a {response.status_code} answer without a \"message\": {body!r}"[:300])
    return None
