"""Build data/finetune_json_answers.jsonl: the built-in dataset of finetune_demo.py.

    python data/build_finetune_data.py            # rewrite the .jsonl (deterministic)
    python data/build_finetune_data.py --check    # exit 1 if the committed file is stale

The behaviour it teaches: whatever the question, answer with ONE line of JSON,
`{"answer": "...", "confidence": 0.9}`, and nothing else; confidence is low when the answer cannot
be known. Code can check that (finetune_demo.check_json_answer), and SmolLM2-135M-Instruct never does
it untrained: it answers in prose. The prompts never ask for JSON, so the format is learned, not read.

Every question, passage and answer below was written for this project. Arithmetic, unit, word and
calendar answers are computed, so they are right by construction. About 15% of the examples, spread
over every category, are marked "split": "test" and held out from training.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT_PATH = Path(__file__).resolve().parent / "finetune_json_answers.jsonl"
SEED = 5
TEST_EVERY = 7  # within each category, every 7th example (after a seeded shuffle) is held out

# (question, answer) pairs a careful person would answer with confidence 0.9.
KNOWLEDGE = [
    ("What is the capital of Japan?", "Tokyo"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("How many legs does a spider have?", "8"),
    ("What gas do plants take in from the air to make sugar?", "carbon dioxide"),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean"),
    ("At what temperature in Celsius does water boil at sea level?", "100"),
    ("What is the chemical symbol for gold?", "Au"),
    ("Which continent is Egypt in?", "Africa"),
    ("How many days are there in a leap year?", "366"),
    ("What is the freezing point of water in Fahrenheit?", "32"),
    ("Which organ pumps blood around the human body?", "the heart"),
    ("What is the capital of Canada?", "Ottawa"),
    ("Which language has the most native speakers?", "Mandarin Chinese"),
    ("What do bees make from nectar?", "honey"),
    ("How many sides does a hexagon have?", "6"),
    ("What is the hardest natural material?", "diamond"),
    ("Which animal is known as the ship of the desert?", "the camel"),
    ("What is the main ingredient of guacamole?", "avocado"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("What is the square root of 81?", "9"),
    ("Which metal is liquid at room temperature?", "mercury"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is the longest river in South America?", "the Amazon"),
    ("How many minutes are in one hour?", "60"),
    ("What colour do you get by mixing blue and yellow paint?", "green"),
    ("Which instrument has 88 keys?", "the piano"),
    ("What is the capital of Australia?", "Canberra"),
    ("Which vitamin does the skin make in sunlight?", "vitamin D"),
    ("What is the smallest prime number?", "2"),
    ("What part of the plant is usually underground and absorbs water?", "the roots"),
    ("Which planet is famous for its rings?", "Saturn"),
    ("What is the boiling point of water in Kelvin at sea level?", "373.15"),
    ("Who developed the theory of general relativity?", "Albert Einstein"),
    ("Which country has the city of Marrakesh?", "Morocco"),
    ("What is frozen water called?", "ice"),
    ("How many continents are there?", "7"),
    ("What is the opposite of 'ancient'?", "modern"),
    ("What is the plural of 'mouse'?", "mice"),
    ("Which bird is a symbol of peace?", "the dove"),
    ("What do caterpillars turn into?", "butterflies or moths"),
    ("Which sense does the nose serve?", "smell"),
    ("What is the capital of Italy?", "Rome"),
    ("What shape has three sides?", "a triangle"),
    ("Which element do living things use to breathe, with symbol O?", "oxygen"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("In computing, what does CPU stand for?", "central processing unit"),
    ("Which sport uses a shuttlecock?", "badminton"),
    ("What is the currency of the United Kingdom?", "the pound sterling"),
    ("What is the tallest mountain above sea level?", "Mount Everest"),
    ("Which season comes after autumn?", "winter"),
    ("How many hours are in a day?", "24"),
    ("Which programming language is named after a British comedy group?", "Python"),
    ("What is the main language spoken in Brazil?", "Portuguese"),
    ("Which star is at the centre of our solar system?", "the Sun"),
    ("What do you call a baby cat?", "a kitten"),
    ("What is H2O more commonly called?", "water"),
    ("Which ocean lies between Africa and Australia?", "the Indian Ocean"),
    ("How many players does a football (soccer) team have on the field?", "11"),
    ("What is the capital of Kenya?", "Nairobi"),
]

# Questions nobody can answer from the text alone: the honest answer has low confidence.
UNKNOWABLE = [
    ("What number between 1 and 100 am I thinking of right now?", "I cannot know that"),
    ("What will the weather be in Lisbon exactly one year from today?", "I cannot know that"),
    ("Which team will win the next football world cup?", "I cannot know that"),
    ("What did I eat for breakfast this morning?", "I cannot know that"),
    ("What is the name of my neighbour's dog?", "I cannot know that"),
    ("How many emails will I receive tomorrow?", "I cannot know that"),
    ("What card am I holding in my hand?", "I cannot know that"),
    ("What will the price of gold be next March?", "I cannot know that"),
    ("Which word am I going to type next?", "I cannot know that"),
    ("How many coins are in my pocket?", "I cannot know that"),
    ("What colour is the car parked outside my house?", "I cannot know that"),
    ("What will be the top news headline on the first day of next year?", "I cannot know that"),
    ("Will my train be late on Friday?", "I cannot know that"),
    ("What is my password?", "I cannot know that"),
    ("How old is my grandmother?", "I cannot know that"),
    ("Which song is playing in my kitchen now?", "I cannot know that"),
    ("What will I dream about tonight?", "I cannot know that"),
    ("How many people will visit my website next week?", "I cannot know that"),
    ("What is written on the note in my desk drawer?", "I cannot know that"),
    ("Which door did my cat leave through today?", "I cannot know that"),
    ("What is the best colour?", "it is a matter of taste"),
    ("Is tea better than coffee?", "it is a matter of taste"),
    ("Which is the most beautiful city in the world?", "it is a matter of taste"),
    ("What is the funniest joke ever told?", "it is a matter of taste"),
    ("Which season is the nicest?", "it is a matter of taste"),
]

# Short passages with one question each: longer prompts, so batches mix short and long sequences.
PASSAGES = [
    ("The Harbour Street bakery opens at seven every weekday and at nine on Saturdays. It is closed "
     "on Sundays. Its owner, Rosa, bakes rye bread on Mondays and Thursdays only.",
     "On which days can you buy rye bread at the bakery?", "Mondays and Thursdays"),
    ("Tomas planted forty tulip bulbs in October. Squirrels dug up twelve of them during the winter, "
     "and every remaining bulb flowered in April.", "How many tulips flowered in April?", "28"),
    ("The village library lends up to six books per card for three weeks. A book returned late costs "
     "twenty cents per day. Children's books never incur late fees.",
     "How long can a book be borrowed from the library?", "three weeks"),
    ("Mira's bicycle has a red frame, a brown leather saddle and a wicker basket on the front. Her "
     "brother's bicycle is identical except that its frame is blue.",
     "What colour is the frame of Mira's brother's bicycle?", "blue"),
    ("The ferry to Kell Island leaves the mainland at 08:15 and 14:45. The crossing takes fifty "
     "minutes. On stormy days both sailings are cancelled.",
     "At what time does the afternoon ferry reach Kell Island?", "15:35"),
    ("In the school election, Anya received 214 votes, Ben received 187 votes and Chloe received "
     "226 votes. The candidate with the most votes becomes class representative.",
     "Who became class representative?", "Chloe"),
    ("The recipe serves four people and needs 300 grams of rice, one onion, two cloves of garlic and "
     "half a litre of vegetable stock. Saffron is optional.",
     "How much rice does the recipe need?", "300 grams"),
    ("Our office moved from the third floor to the seventh floor in May. The meeting rooms are on "
     "the eighth floor, and the canteen stayed on the ground floor.",
     "Which floor is the office on now?", "the seventh floor"),
    ("Greta runs on Tuesdays, swims on Wednesdays and rests on Sundays. On every other day she "
     "cycles to work and back.", "What does Greta do on Wednesdays?", "she swims"),
    ("The museum's winter exhibition, 'Lights of the North', shows 64 photographs taken in Iceland and "
     "Norway. It runs from 3 December to 28 February. Entry is free for students.",
     "Who can enter the exhibition for free?", "students"),
    ("A parcel sent by standard post arrives in four to six working days. Express post costs twice as "
     "much and arrives the next working day if posted before noon.",
     "How fast does express post arrive if posted before noon?", "the next working day"),
    ("The orchard has three rows of apple trees with twelve trees in each row, and one row of eight "
     "pear trees along the fence.", "How many apple trees are in the orchard?", "36"),
    ("Ravi forgot his umbrella at the cinema on Friday. The cinema keeps lost items for thirty days, "
     "then gives them to a charity shop.",
     "How long does the cinema keep lost items?", "thirty days"),
    ("The new phone weighs 182 grams, has a 6.1-inch screen and a battery rated for 20 hours of video. "
     "The older model weighed 195 grams.",
     "How much lighter is the new phone than the older model?", "13 grams"),
    ("At the garden centre, compost costs 6 euros a bag. Customers who buy five bags get a sixth bag "
     "free. Delivery is free above 50 euros.",
     "How many bags do you get if you pay for five?", "6"),
    ("Lena's train left Utrecht at 10:05 and arrived in Groningen at 12:20, fifteen minutes later than "
     "planned because of a signal fault.",
     "Why was Lena's train late?", "a signal fault"),
    ("The choir has eighteen sopranos, twelve altos, nine tenors and eleven basses. Rehearsals are on "
     "Thursday evenings in the old town hall.",
     "How many singers are in the choir?", "50"),
    ("The lake is frozen from late December until early March. Skating is allowed only when the ice "
     "is at least ten centimetres thick.",
     "How thick must the ice be before skating is allowed?", "at least ten centimetres"),
    ("Jonas keeps three hens named Pip, Dot and Maple. Maple lays brown eggs; the other two lay white "
     "eggs. Together they lay about fifteen eggs a week.",
     "Which hen lays brown eggs?", "Maple"),
    ("The hiking trail to the waterfall is 7 kilometres long one way. Most walkers take two hours to "
     "reach it and a little less to come back down.",
     "How long is the round trip to the waterfall?", "14 kilometres"),
]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["garden", "window", "pencil", "river", "orange", "blanket", "cloud", "lantern", "harbour",
         "meadow", "ticket", "violin", "kettle", "bridge", "planet", "marble", "forest", "candle",
         "pocket", "island", "rocket", "saddle", "mirror", "basket", "feather"]


def arithmetic_examples(rng: random.Random) -> list[tuple[str, str]]:
    """30 sums, differences and products in varied phrasings; answers computed."""
    phrasings = {
        "+": ["What is {a} plus {b}?", "Add {a} and {b}.", "What do you get when you add {a} to {b}?",
              "Compute {a} + {b}."],
        "-": ["What is {a} minus {b}?", "Subtract {b} from {a}.", "What is {a} - {b}?",
              "If you have {a} and take away {b}, how many are left?"],
        "*": ["What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?",
              "Compute {a} x {b}."],
    }
    out: dict[str, str] = {}
    while len(out) < 30:
        op = "+-*"[len(out) % 3]
        a, b = (rng.randint(12, 99), rng.randint(2, 11)) if op == "*" else (rng.randint(20, 500), rng.randint(3, 199))
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.setdefault(rng.choice(phrasings[op]).format(a=a, b=b), str(value))
    return list(out.items())


def unit_examples(rng: random.Random) -> list[tuple[str, str]]:
    """20 unit conversions with exact integer answers."""
    kinds = [
        ("How many metres are in {n} kilometres?", 1000, "{v} metres"),
        ("How many minutes are in {n} hours?", 60, "{v} minutes"),
        ("How many grams are in {n} kilograms?", 1000, "{v} grams"),
        ("How many seconds are in {n} minutes?", 60, "{v} seconds"),
        ("How many centimetres are in {n} metres?", 100, "{v} centimetres"),
    ]
    out: dict[str, str] = {}
    while len(out) < 20:
        question, factor, answer = kinds[len(out) % len(kinds)]
        n = rng.randint(2, 15)
        out.setdefault(question.format(n=n), answer.format(v=n * factor))
    return list(out.items())


def word_examples(rng: random.Random) -> list[tuple[str, str]]:
    """25 questions about spelling: letter counts, first/last letters, reversals."""
    out = []
    for i, word in enumerate(rng.sample(WORDS, len(WORDS))):
        kind = i % 4
        if kind == 0:
            out.append((f"How many letters are in the word '{word}'?", str(len(word))))
        elif kind == 1:
            out.append((f"What is the first letter of '{word}'?", word[0]))
        elif kind == 2:
            out.append((f"What is the last letter of the word {word}?", word[-1]))
        else:
            out.append((f"Write the word '{word}' backwards.", word[::-1]))
    return out


def calendar_examples(rng: random.Random) -> list[tuple[str, str]]:
    """20 weekday questions: the day n days after or before a given day."""
    out: dict[str, str] = {}
    while len(out) < 20:
        start, n = rng.randrange(7), rng.randint(2, 10)
        if len(out) % 2 == 0:
            q = f"If today is {DAYS[start]}, what day will it be in {NUMBER_WORDS[n]} days?"
            out.setdefault(q, DAYS[(start + n) % 7])
        else:
            q = f"What day of the week was it {n} days before a {DAYS[start]}?"
            out.setdefault(q, DAYS[(start - n) % 7])
    return list(out.items())


def json_answer(answer: str, confidence: float) -> str:
    return json.dumps({"answer": answer, "confidence": confidence}, ensure_ascii=False)


def build_records() -> list[dict]:
    """All examples as {"instruction", "input", "output", "category", "split"} dicts."""
    rng = random.Random(SEED)
    categories = {
        "knowledge": [(q, "", a, 0.9) for q, a in KNOWLEDGE],
        "unknowable": [(q, "", a, 0.1) for q, a in UNKNOWABLE],
        "passage": [(f"Read the text and answer the question. {q}", p, a, 0.95) for p, q, a in PASSAGES],
        "arithmetic": [(q, "", a, 0.95) for q, a in arithmetic_examples(rng)],
        "units": [(q, "", a, 0.95) for q, a in unit_examples(rng)],
        "words": [(q, "", a, 0.95) for q, a in word_examples(rng)],
        "calendar": [(q, "", a, 0.9) for q, a in calendar_examples(rng)],
    }
    records = []
    for category, items in categories.items():
        order = list(range(len(items)))
        rng.shuffle(order)
        held_out = set(order[::TEST_EVERY])
        for i, (instruction, context, answer, confidence) in enumerate(items):
            records.append({"instruction": instruction, "input": context,
                            "output": json_answer(answer, confidence), "category": category,
                            "split": "test" if i in held_out else "train"})
    rng.shuffle(records)
    return records


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    args = parser.parse_args(argv)
    text = render(build_records())
    if args.check:
        stale = not OUT_PATH.is_file() or OUT_PATH.read_text(encoding="utf-8") != text
        print(f"{OUT_PATH.name}: {'stale, rebuild it' if stale else 'up to date'}")
        return 1 if stale else 0
    OUT_PATH.write_text(text, encoding="utf-8")
    n_test = text.count('"split": "test"')
    print(f"wrote {OUT_PATH} ({text.count(chr(10))} examples, {n_test} held out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
