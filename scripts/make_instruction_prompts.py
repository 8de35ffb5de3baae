"""Writes falcon_ext/prompt_data/instructions_train.jsonl: synthetic chat prompts for drafter
self-distillation, one {"category", "prompt"} record a line.

Why synthetic: the only chat prompt sets on hand are the evaluation sets (MT-Bench, Spec-Bench),
which must stay out of training, and GSM8K, which is only grade-school maths. These templates
cover the other kinds of request a chat model answers (writing, role play, reasoning, coding,
extraction, science, humanities, advice), so the drafter sees the target's own style across
them. Deterministic: the same seed writes the same file.

    python scripts/make_instruction_prompts.py [--count 1200] [--seed 0]
"""
import argparse
import json
import random
from pathlib import Path

TOPICS = [
    "the ocean", "a rainy day", "friendship", "space travel", "a small village", "climate change",
    "artificial intelligence", "the history of bread", "volcanoes", "a lost dog", "learning to swim",
    "the moon", "electric cars", "a busy market", "winter holidays", "honeybees", "the internet",
    "a mountain hike", "renewable energy", "a birthday party", "ancient Rome", "photosynthesis",
    "public libraries", "a first job", "coffee", "the human heart", "recycling", "a robot chef",
    "trains", "music lessons", "desert animals", "the printing press", "city parks", "earthquakes",
    "a haunted house", "healthy sleep", "chess", "the water cycle", "a science fair", "gardening",
]
PEOPLE = ["a pirate captain", "a medieval knight", "a travel guide in Paris", "a detective",
          "a friendly librarian", "a football coach", "a chef in a busy kitchen", "an astronaut",
          "a museum guide", "a shopkeeper", "a teacher on the first day of school", "a wizard"]
CODE_TASKS = ["reverses a string", "checks whether a number is prime", "counts the words in a sentence",
              "finds the largest element of a list", "removes duplicates from a list",
              "computes the factorial of n", "merges two sorted lists", "checks whether a string is a palindrome",
              "returns the n-th Fibonacci number", "converts Celsius to Fahrenheit",
              "sorts a list of dictionaries by a key", "reads a CSV file and sums a column"]
LANGS = ["Python", "JavaScript", "C++", "Java", "SQL", "Rust"]
TEMPLATES = {
    "writing": ["Write a short story about {topic}.", "Write a poem about {topic}.",
                "Write a blog post about {topic}.", "Write a persuasive paragraph about {topic}.",
                "Write an email to a friend about {topic}.", "Write a product description for something related to {topic}."],
    "roleplay": ["Pretend you are {person}. Introduce yourself.", "You are {person}. Describe your typical day.",
                 "Act as {person} and give advice to a beginner.", "As {person}, tell me about {topic}."],
    "reasoning": ["If a train leaves at {h}:00 and travels for {n} hours, what time does it arrive? Explain.",
                  "Tom is older than Ann, and Ann is older than Bob. Who is the youngest? Explain your reasoning.",
                  "What are the pros and cons of {topic}?", "Why might someone disagree about {topic}? Give two views."],
    "math": ["What is {a} times {b}? Show your steps.", "Solve for x: {a}x + {b} = {c}.",
             "A shop sells pens for ${a} each. How much do {b} pens cost?",
             "What is {a} percent of {c}?", "Explain how to add the fractions 1/{a} and 1/{b}."],
    "coding": ["Write a {lang} function that {task}.", "Explain what a {lang} program that {task} would look like.",
               "How do I write code in {lang} that {task}?", "Find the bug: a {lang} function that {task} returns the wrong result for an empty input. How should it handle that case?"],
    "extraction": ["List three key facts about {topic}.", "Summarise the main ideas of {topic} in three bullet points.",
                   "Give me five keywords related to {topic}.", "Make a table of two advantages and two disadvantages of {topic}."],
    "stem": ["Explain {topic} to a ten-year-old.", "How does {topic} work?", "What is the science behind {topic}?",
             "Describe an experiment about {topic}."],
    "humanities": ["What is the history of {topic}?", "How has {topic} changed society?",
                   "Describe the role of {topic} in culture.", "What can people learn from {topic}?"],
}


def make_prompts(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    categories = sorted(TEMPLATES)
    seen, records = set(), []
    while len(records) < count:
        category = categories[len(records) % len(categories)]
        text = rng.choice(TEMPLATES[category]).format(
            topic=rng.choice(TOPICS), person=rng.choice(PEOPLE), task=rng.choice(CODE_TASKS),
            lang=rng.choice(LANGS), h=rng.randint(1, 11), n=rng.randint(2, 9),
            a=rng.randint(2, 40), b=rng.randint(2, 40), c=rng.randint(50, 400))
        if text not in seen:
            seen.add(text)
            records.append({"category": category, "prompt": text})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "falcon_ext" / "prompt_data"
                                             / "instructions_train.jsonl"))
    args = parser.parse_args()
    with open(args.out, "w") as f:
        for record in make_prompts(args.count, args.seed):
            f.write(json.dumps(record) + "\n")
    print(f"wrote {args.count} prompts to {args.out}")


if __name__ == "__main__":
    main()
