from tests.e2e.harness import body, key_name_of


def test_create_poll_settle(make_gateway, sim):
    gw = make_gateway()
    with gw.client("alice") as client:
        response = client.post("/videos/generations", json=body(prompt="sim:seconds=0.5 a fox"))
        assert response.status_code == 200, response.text
        tid = response.json()["id"]
        import time

        time.sleep(0.8)
        response = client.get(f"/videos/generations/{tid}")
        assert response.json()["status"] == "succeeded"
    assert {key_name_of(x["key"]) for x in sim.requests()} == {"key-a"}
    lines = gw.lines()
    assert any(line["event"] == "task.settled" for line in lines)
