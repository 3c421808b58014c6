"""Who gets in: API keys on the router, the internal token and TLS on the gRPC links, request limits, and bad
input that once crashed the router (each a 4xx now, on a connection that stays usable)."""
from __future__ import annotations

import datetime
import ipaddress
import json
import socket

import anyio.to_thread
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_security import TransportSecurity
from proto import hack_pb2, hack_pb2_grpc
from router.main import build_parser, config_from_args
from tests.router.fake_instances import FakeDecode, FakePrefill, serve
from tests.router.harness import cluster, script

pytestmark = pytest.mark.anyio

TEXT = " the cat sat."


def completion(**fields: object) -> dict:
    return {"model": "byte-model", "prompt": "Once", "max_tokens": 20, **fields}


def chat(**fields: object) -> dict:
    return {"model": "byte-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, **fields}


def instances(tokenizer, **decode: object) -> tuple[list[FakePrefill], list[FakeDecode]]:
    first, rest = script(tokenizer, TEXT)
    return [FakePrefill(first)], [FakeDecode(rest, **decode)]


# ---------------------------------------------------------------------------------------------------------------
# API keys
# ---------------------------------------------------------------------------------------------------------------


async def test_api_keys_guard_v1_and_leave_probes_open(byte_model, byte_tokenizer):
    async with cluster(byte_model, *instances(byte_tokenizer), api_keys=("key-one", "key-two")) as c:
        missing = await c.client.post("/v1/completions", json=completion())
        wrong = await c.client.post("/v1/completions", json=completion(), headers={"Authorization": "Bearer nope"})
        models = await c.client.get("/v1/models")
        good = [await c.client.post("/v1/completions", json=completion(), headers={"Authorization": f"Bearer {k}"})
                for k in ("key-one", "key-two")]
        open_paths = [(await c.client.get(path)).status_code for path in ("/health", "/ready", "/metrics")]
    for refused in (missing, wrong, models):
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"] == {"message": "Missing or incorrect API key: send `Authorization: Bearer "
                                           "<key>`.", "type": "invalid_request_error", "param": None,
                                           "code": "invalid_api_key"}
    assert [r.status_code for r in good] == [200, 200] and good[0].json()["choices"][0]["text"] == TEXT
    assert open_paths == [200, 200, 200]


def test_api_keys_come_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("HACK_API_KEY", "a,b")
    args = build_parser().parse_args(["--prefill", "h:1", "--decode", "h:2"])
    assert config_from_args(args).api_keys == ("a", "b")
    args = build_parser().parse_args(["--prefill", "h:1", "--decode", "h:2", "--api-key", "c"])
    assert config_from_args(args).api_keys == ("c",)


def test_standalone_router_listens_on_loopback_by_default(monkeypatch):
    monkeypatch.delenv("HACK_HOST", raising=False)
    args = build_parser().parse_args(["--prefill", "h:1", "--decode", "h:2"])
    assert config_from_args(args).host == "127.0.0.1"


# ---------------------------------------------------------------------------------------------------------------
# Limits and bad input
# ---------------------------------------------------------------------------------------------------------------


async def test_request_limits_are_clear_4xx(byte_model, byte_tokenizer):
    limits = dict(max_request_bytes=2000, max_prompt_tokens=8, max_messages=2, max_tokens_limit=10)
    async with cluster(byte_model, *instances(byte_tokenizer), **limits) as c:
        big = await c.client.post("/v1/completions", json=completion(prompt="x" * 3000))

        async def chunked():  # no Content-Length: counted while it is read
            yield b'{"model": "byte-model", "prompt": "'
            for _ in range(30):
                yield b"y" * 100
            yield b'"}'
        big_chunked = await c.client.post("/v1/completions", content=chunked(),
                                          headers={"Content-Type": "application/json"})
        long_prompt = await c.client.post("/v1/completions", json=completion(prompt="a long prompt here"))
        messages = await c.client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "a"}] * 3))
        max_tokens = await c.client.post("/v1/completions", json=completion(max_tokens=11))
        default_max = await c.client.post("/v1/completions", json=completion(max_tokens=None))
        within = await c.client.post("/v1/completions", json=completion(max_tokens=10))
    for response, status, param in ((big, 413, None), (big_chunked, 413, None), (long_prompt, 400, "prompt"),
                                    (messages, 400, "messages"), (max_tokens, 400, "max_tokens")):
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == param and ("limit" in error["message"]), error
    assert within.status_code == 200
    assert default_max.status_code == 200 and c.decodes[0].generate_requests[-2].max_tokens == 10


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", completion(prompt="\ud800"), "prompt"),
    ("/v1/completions", completion(prompt=["ok \udfff"]), "prompt"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "a\ud800b"}]), "messages.0.content"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]),
     "messages.0.content"),
    ("/v1/completions", completion(stop_token_ids=[2147483648]), "stop_token_ids.0"),
    ("/v1/completions", completion(stop_token_ids=[2**70]), "stop_token_ids.0"),
])
async def test_input_that_crashed_the_router_is_a_400(byte_model, byte_tokenizer, path, body, param):
    async with cluster(byte_model, *instances(byte_tokenizer)) as c:
        # json.dumps escapes a lone surrogate as "\\ud800", as a client's JSON encoder may send it
        response = await c.client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        after = await c.client.post("/v1/completions", json=completion())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert after.status_code == 200


async def test_a_huge_top_k_is_no_server_error(byte_model, byte_tokenizer):
    async with cluster(byte_model, *instances(byte_tokenizer)) as c:
        response = await c.client.post("/v1/completions", json=completion(top_k=2147483648))
    assert response.status_code < 500, response.text
    if response.status_code == 200:  # a k past the vocabulary keeps every token
        assert c.decodes[0].generate_requests[0].sampling.top_k == 259


def raw_request(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request on `sock`, read its (Content-Length) response; (status, body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        body += chunk
    return int(head.split(b" ")[1]), body


async def test_a_500_keeps_the_connection_alive(byte_model, byte_tokenizer, anyio_backend):
    async with cluster(byte_model, *instances(byte_tokenizer)) as c:
        async def broken(request):
            raise RuntimeError("a bug")
        c.app.state.serving.completion = broken
        host, port = c.url.removeprefix("http://").split(":")
        body = b'{"model": "byte-model", "prompt": "Once"}'
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"

        def exchange() -> list[tuple[int, bytes]]:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                return [raw_request(sock, request), raw_request(sock, health)]

        (status, error_body), (health_status, health_body) = await anyio.to_thread.run_sync(exchange)
    assert status == 500 and b"internal error: RuntimeError" in error_body
    assert health_status == 200 and health_body == b'{"status":"ok"}'


async def test_a_kv_mode_no_instance_serves_is_a_400_naming_the_served_ones(byte_model, byte_tokenizer):
    async with cluster(byte_model, *instances(byte_tokenizer, kv_mode=hack_pb2.KV_MODE_HACK)) as c:
        await c.pool.poll_once()
        refused = await c.client.post("/v1/completions", json=completion(kv_mode="fp16"))
        served = await c.client.post("/v1/completions", json=completion(kv_mode="hack"))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "kv_mode" and error["code"] == "kv_mode_not_served" and "serves hack" in error["message"]
    assert served.status_code == 200


async def test_health_is_json_and_the_schema_documents_400_not_422(byte_model, byte_tokenizer):
    async with cluster(byte_model, *instances(byte_tokenizer)) as c:
        health = await c.client.get("/health")
        schema = (await c.client.get("/openapi.json")).json()
    assert health.headers["content-type"] == "application/json" and health.json() == {"status": "ok"}
    responses = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in responses and {"200", "400", "413"} <= set(responses)
    assert "422" not in str(schema)


async def test_decode_gauges_are_fresh_and_drop_a_dead_instance(byte_model, byte_tokenizer):
    prefills, decodes = instances(byte_tokenizer)
    async with cluster(byte_model, prefills, decodes) as c:
        address = c.decode_addresses[0]
        decodes[0].free_kv_blocks = 777  # changed after the first poll; health_interval_s is 60 s in the harness
        fresh = (await c.client.get("/metrics")).text
        await c.decode_servers[0].stop()
        dead = (await c.client.get("/metrics")).text
    assert f'hack_router_decode_free_kv_blocks{{address="{address}"}} 777.0' in fresh
    assert "hack_router_decode_free_kv_blocks{" not in dead
    assert f'hack_router_instance_healthy{{address="{address}",role="decode"}} 0.0' in dead


# ---------------------------------------------------------------------------------------------------------------
# The internal token and TLS on the gRPC links
# ---------------------------------------------------------------------------------------------------------------


async def test_instances_refuse_rpcs_without_the_internal_token(byte_tokenizer):
    first, rest = script(byte_tokenizer, TEXT)
    async with serve(FakeDecode(rest), security=TransportSecurity(internal_token="s3cret")) as running:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = hack_pb2_grpc.DecodeServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as stats_error:
                await stub.Stats(hack_pb2.StatsRequest(), timeout=5)
            generate = stub.Generate(hack_pb2.GenerateRequest(request_id="r", prompt_len=1, max_tokens=1))
            with pytest.raises(grpc.aio.AioRpcError) as generate_error:
                await generate.read()
            with pytest.raises(grpc.aio.AioRpcError) as push_error:
                await stub.PushKV(iter([hack_pb2.KVChunk(header=hack_pb2.KVHeader(request_id="r"))]), timeout=5)
            wrong = hack_pb2_grpc.DecodeServiceStub(channel).Stats(
                hack_pb2.StatsRequest(), metadata=(("authorization", "Bearer guess"),), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as wrong_error:
                await wrong
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        async with TransportSecurity(internal_token="s3cret").channel(running.address) as channel:
            stats = await hack_pb2_grpc.DecodeServiceStub(channel).Stats(hack_pb2.StatsRequest(), timeout=5)
    for error in (stats_error, generate_error, push_error, wrong_error):
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no secret
    assert stats.model == "fake"


def self_signed_certificate(directory) -> tuple[str, str]:
    """A certificate for localhost / 127.0.0.1 and its key, as PEM files (the certificate is its own CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_router_reaches_instances_over_tls_with_the_token(byte_model, byte_tokenizer, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    server = TransportSecurity(internal_token="t0ken", tls_cert=cert, tls_key=key)
    client = TransportSecurity(internal_token="t0ken", tls_ca=cert)
    prefills, decodes = instances(byte_tokenizer)
    prefills[0].push_security = client
    async with cluster(byte_model, prefills, decodes, server_security=server, security=client) as c:
        response = await c.client.post("/v1/completions", json=completion())

        def plaintext_refused() -> bool:  # a blocking channel: grpc.aio's poller outlives a failed handshake
            with grpc.insecure_channel(c.decode_addresses[0]) as channel:
                try:
                    hack_pb2_grpc.DecodeServiceStub(channel).Stats(hack_pb2.StatsRequest(), metadata=(
                        ("authorization", "Bearer t0ken"),), timeout=2)
                except grpc.RpcError as error:
                    return error.code() == grpc.StatusCode.UNAVAILABLE
            return False
        refused = await anyio.to_thread.run_sync(plaintext_refused)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == TEXT
    assert refused  # a TLS port does not talk plaintext


async def test_router_without_the_token_finds_no_instance(byte_model, byte_tokenizer):
    async with cluster(byte_model, *instances(byte_tokenizer),
                       server_security=TransportSecurity(internal_token="t0ken")) as c:
        response = await c.client.post("/v1/completions", json=completion())
    assert response.status_code == 503  # Stats fails UNAUTHENTICATED: no instance is healthy


def test_tls_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="go together"):
        TransportSecurity(tls_cert=str(tmp_path / "c.pem"))
    with pytest.raises(ValueError, match="not a readable file"):
        TransportSecurity(tls_ca=str(tmp_path / "missing.pem"))
