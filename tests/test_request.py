"""Request building: every seed parameter reaches the body unchanged, in the multimodal shape."""

from pipeline.core.config import ImagesConfig, RequestConfig
from pipeline.core.request import RequestBuilder, render_prompt

URI = "data:image/png;base64,AAAA"


def test_minimal_body_shape():
    body = RequestBuilder(RequestConfig(model="gpt-4o")).build("Describe.", URI)
    assert body == {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Describe."},
            {"type": "image_url", "image_url": {"url": URI}},
        ]}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_every_seed_parameter_reaches_the_wire_unchanged():
    params = dict(
        temperature=0.2, top_p=0.9, n=2, stop=["\n\n", "END"], max_tokens=77, presence_penalty=0.5,
        frequency_penalty=-0.5, logit_bias={"50256": -100}, user="user-42",
        response_format={"type": "json_object"}, seed=7,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "f"}},
    )
    body = RequestBuilder(RequestConfig(model="m", **params)).build("p", URI)
    for name, value in params.items():
        assert body[name] == value, name
    assert body["stream"] is True


def test_system_detail_and_extra_body():
    config = RequestConfig(model="m", system="Be precise.", extra_body={"top_k": 20, "max_tokens": 5},
                           stream_options=None)
    body = RequestBuilder(config, ImagesConfig(detail="low")).build("p", URI)
    assert body["messages"][0] == {"role": "system", "content": "Be precise."}
    assert body["messages"][1]["content"][1]["image_url"] == {"url": URI, "detail": "low"}
    assert body["top_k"] == 20 and body["max_tokens"] == 5
    assert "stream_options" not in body


def test_max_response_bytes_is_client_side_never_sent_nor_in_the_key():
    from pipeline.core.request import answer_params_digest

    capped = RequestConfig(model="m", max_response_bytes=4096)
    assert capped.max_response_bytes == 4096 and RequestConfig(model="m").max_response_bytes == 8 * 1024 * 1024
    builder = RequestBuilder(capped)
    assert "max_response_bytes" not in builder.build("p", URI)
    assert b"max_response_bytes" not in builder.build_payload("p", URI)
    assert answer_params_digest(capped) == answer_params_digest(RequestConfig(model="m"))
    assert answer_params_digest(RequestConfig(model="m", seed=1)) != answer_params_digest(RequestConfig(model="m"))


def test_the_answer_key_of_existing_jobs_never_changes_with_an_upgrade():
    """Every row's resume digest and request key start from this digest: if a new config field (with its
    default) changes it, every job's rows look changed after an upgrade and are all sent again, paid twice.
    These values were computed by the pipeline before issue 13; a new field that changes no answer goes in
    ``_HOW_IMAGES_ARE_FETCHED`` / ``_CLIENT_SIDE_FIELDS``, one that does must not change it at its default."""
    from pipeline.core.config import ImagesConfig
    from pipeline.core.request import answer_params_digest

    plain = answer_params_digest(RequestConfig(model="gpt-4o", prompt="Describe this image."), ImagesConfig())
    assert plain == "ee4b2bae321d6384668f7989650474ebee0827084882b332bd458faadfc5a90e"
    tuned = answer_params_digest(
        RequestConfig(model="gpt-4o", prompt="Describe this image.", max_tokens=200, temperature=0.2),
        ImagesConfig(detail="low", fit="openai-high", format="jpeg"))
    assert tuned == "625fbfaf300714cae7ce837ac5407a9cd04fc2f20f28f0f052b35c0ad641ecfe"


def test_how_images_travel_is_not_part_of_the_answer_key():
    from pipeline.core.config import ImagesConfig
    from pipeline.core.request import answer_params_digest

    request = RequestConfig(model="m")
    routed = ImagesConfig(proxy="http://gw.corp:3128", tls={"ca_file": "corp.pem"}, download_attempts=5,
                          allow_hosts=["10.0.0.0/8"])
    assert answer_params_digest(request, routed) == answer_params_digest(request, ImagesConfig())


def test_render_prompt():
    assert render_prompt("Describe {path} ({label}).", {"path": "a.jpg", "label": None}) == "Describe a.jpg ()."
    assert render_prompt("No fields {{here}}", {}) == "No fields {here}"
    assert render_prompt("plain", {}) == "plain"


def test_build_payload_is_build_serialised():
    """The spliced JSON bytes must say exactly what the dict says, for any prompt and URL."""
    import orjson

    config = RequestConfig(model="m", system='Be "exact"', temperature=0.2, n=2, stop=["\n"], seed=3,
                           tools=[{"type": "function", "function": {"name": "f"}}], extra_body={"top_k": 5})
    builder = RequestBuilder(config, ImagesConfig(detail="high"))
    prompts = ["Describe.", 'quotes " backslash \\ newline \n unicode é 漢字 nul \x00', ""]
    urls = [URI, "data:image/jpeg;base64,/9j/4AAQSkZJRg==", 'https://example.com/a.jpg?q="x"', 'data:x"y']
    for prompt in prompts:
        for url in urls:
            assert orjson.loads(builder.build_payload(prompt, url)) == builder.build(prompt, url)
