"""Regenerate the method study's data (benchmarks/study.py) offline from reasoning-gym:

    python benchmarks/study_data/make.py                          # the committed files
    python benchmarks/study_data/make.py --train-per-task 1024    # more, to scale the study up

- train.jsonl: 256 examples, 64 from each of four generators: basic_arithmetic (arithmetic),
  leg_counting and letter_counting (counting), aiw (sibling word problems). The study carves
  its learning-rate validation split from these.
- indomain.jsonl: 300 questions from the same generators with other seeds (75 each): accuracy
  and per-epoch gold perplexity.
- unseen.jsonl: 150 questions from three generators the runs never train on (spell_backward,
  sentence_reordering, calendar_arithmetic): per-epoch gold perplexity only.
- general.jsonl: capital cities of 164 countries (general ability, i.e. forgetting).
Every record has a stable id, its generator (`task`), the gold `answer` and the gold response.
"""
import argparse
import json
import os
import re

import reasoning_gym
from reasoning_gym.arithmetic.leg_counting import ANIMALS

HERE = os.path.dirname(os.path.abspath(__file__))
EASY = {"basic_arithmetic": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
        "leg_counting": dict(min_animals=1, max_animals=2, max_instances=4),
        "letter_counting": dict(min_words=3, max_words=6),
        "aiw": dict(task_type_weights=[1.0, 0.0, 0.0])}  # Alice-in-Wonderland sibling problems
UNSEEN = {"spell_backward": dict(min_word_len=3, max_word_len=6), "sentence_reordering": {},
          "calendar_arithmetic": {}}
# Countries whose capital has one plain ASCII spelling (no accents, no disputed or split capitals).
CAPITALS = """Afghanistan:Kabul; Albania:Tirana; Algeria:Algiers; Andorra:Andorra la Vella; Angola:Luanda;
Argentina:Buenos Aires; Armenia:Yerevan; Australia:Canberra; Austria:Vienna; Azerbaijan:Baku; Bahamas:Nassau;
Bahrain:Manama; Bangladesh:Dhaka; Barbados:Bridgetown; Belarus:Minsk; Belgium:Brussels; Belize:Belmopan;
Bhutan:Thimphu; Bosnia and Herzegovina:Sarajevo; Botswana:Gaborone; Bulgaria:Sofia; Burkina Faso:Ouagadougou;
Cambodia:Phnom Penh; Canada:Ottawa; Chile:Santiago; China:Beijing; Croatia:Zagreb; Cuba:Havana;
Cyprus:Nicosia; Czech Republic:Prague; Denmark:Copenhagen; Djibouti:Djibouti;
Dominican Republic:Santo Domingo; Ecuador:Quito; Egypt:Cairo; El Salvador:San Salvador; Eritrea:Asmara;
Estonia:Tallinn; Ethiopia:Addis Ababa; Fiji:Suva; Finland:Helsinki; France:Paris; Gabon:Libreville;
Georgia:Tbilisi; Germany:Berlin; Ghana:Accra; Greece:Athens; Guatemala:Guatemala City; Guinea:Conakry;
Guyana:Georgetown; Haiti:Port-au-Prince; Honduras:Tegucigalpa; Hungary:Budapest; Iceland:Reykjavik;
India:New Delhi; Indonesia:Jakarta; Iran:Tehran; Iraq:Baghdad; Ireland:Dublin; Italy:Rome; Jamaica:Kingston;
Japan:Tokyo; Jordan:Amman; Kenya:Nairobi; Kuwait:Kuwait City; Kyrgyzstan:Bishkek; Laos:Vientiane;
Latvia:Riga; Lebanon:Beirut; Liberia:Monrovia; Libya:Tripoli; Liechtenstein:Vaduz; Lithuania:Vilnius;
Luxembourg:Luxembourg; Madagascar:Antananarivo; Malawi:Lilongwe; Malaysia:Kuala Lumpur; Mali:Bamako;
Malta:Valletta; Mauritania:Nouakchott; Mauritius:Port Louis; Mexico:Mexico City; Monaco:Monaco;
Montenegro:Podgorica; Morocco:Rabat; Mozambique:Maputo; Namibia:Windhoek; Nepal:Kathmandu;
Netherlands:Amsterdam; New Zealand:Wellington; Nicaragua:Managua; Niger:Niamey; Nigeria:Abuja;
North Korea:Pyongyang; North Macedonia:Skopje; Norway:Oslo; Oman:Muscat; Pakistan:Islamabad;
Panama:Panama City; Papua New Guinea:Port Moresby; Peru:Lima; Philippines:Manila; Poland:Warsaw;
Portugal:Lisbon; Qatar:Doha; Romania:Bucharest; Russia:Moscow; Rwanda:Kigali; Saudi Arabia:Riyadh;
Senegal:Dakar; Serbia:Belgrade; Sierra Leone:Freetown; Singapore:Singapore; Slovakia:Bratislava;
Slovenia:Ljubljana; Somalia:Mogadishu; South Korea:Seoul; South Sudan:Juba; Spain:Madrid; Sudan:Khartoum;
Suriname:Paramaribo; Sweden:Stockholm; Switzerland:Bern; Syria:Damascus; Taiwan:Taipei; Tajikistan:Dushanbe;
Thailand:Bangkok; Trinidad and Tobago:Port of Spain; Tunisia:Tunis; Turkey:Ankara; Turkmenistan:Ashgabat;
Uganda:Kampala; United Arab Emirates:Abu Dhabi; United Kingdom:London; United States:Washington;
Uruguay:Montevideo; Uzbekistan:Tashkent; Venezuela:Caracas; Vietnam:Hanoi; Zambia:Lusaka; Zimbabwe:Harare;
Samoa:Apia; Vanuatu:Port Vila; Solomon Islands:Honiara; Brunei:Bandar Seri Begawan; Timor-Leste:Dili;
Cape Verde:Praia; Gambia:Banjul; Lesotho:Maseru; Equatorial Guinea:Malabo; Central African Republic:Bangui;
Republic of the Congo:Brazzaville; Democratic Republic of the Congo:Kinshasa; Guinea-Bissau:Bissau;
Comoros:Moroni; Saint Lucia:Castries; Dominica:Roseau; Palau:Ngerulmud; Tuvalu:Funafuti;
Marshall Islands:Majuro; Micronesia:Palikir; San Marino:San Marino; Vatican City:Vatican City;
Seychelles:Victoria"""


def solution(task: str, entry: dict) -> str:
    meta, answer = entry["metadata"], entry["answer"]
    if task == "basic_arithmetic":
        return f"{meta['expression']} = {answer}\nThe answer is {answer}."
    if task == "leg_counting":
        parts = [f"{n} x {ANIMALS[animal]} legs ({animal}) = {n * ANIMALS[animal]}"
                 for animal, n in meta["animals"].items()]
        return "\n".join(parts) + f"\nThe answer is {answer}."
    if task == "aiw":  # "<Name> has B brothers and she also has S sisters. How many sisters does ...'s brother have?"
        name, sisters = entry["question"].split()[0], int(re.search(r"has (\d+) sisters", entry["question"]).group(1))
        assert int(answer) == sisters + 1, entry
        return f"The brother has {name}'s {sisters} sisters and {name} herself: {sisters} + 1 = {answer}.\n" \
               f"The answer is {answer}."
    return f"The answer is {answer}" + ("" if answer[-1] in ".?!" else ".")


def generate(tasks: dict, per_task: int, seed: int, exclude: list = ()) -> list:
    """per_task examples of each generator, none with a question already in `exclude` or twice."""
    records, seen = [], {r["instruction"] for r in exclude}
    for task, settings in tasks.items():
        kept = 0
        for i, entry in enumerate(reasoning_gym.create_dataset(task, size=3 * per_task, seed=seed, **settings)):
            question = entry["question"].strip()
            if question in seen:
                continue
            seen.add(question)
            records.append({"id": f"{task}-{seed}-{i}", "task": task, "instruction": question,
                            "output": solution(task, entry), "answer": str(entry["answer"])})
            kept += 1
            if kept == per_task:
                break
        assert kept == per_task, f"{task}: only {kept} distinct questions"
    return records


def capitals() -> list:
    pairs = [pair.strip().split(":") for pair in CAPITALS.replace("\n", " ").split(";")]
    return [{"id": f"capital-{country.lower().replace(' ', '-')}", "task": "capitals",
             "instruction": f"What is the capital of {country}?", "output": f"The capital of {country} is {city}.",
             "answer": city} for country, city in pairs]


def write(name: str, records: list) -> None:
    with open(os.path.join(HERE, name), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-per-task", type=int, default=64)
    ap.add_argument("--eval-per-task", type=int, default=75)
    ap.add_argument("--unseen-per-task", type=int, default=50)
    args = ap.parse_args()
    train = generate(EASY, args.train_per_task, seed=101)
    write("train.jsonl", train)
    write("indomain.jsonl", generate(EASY, args.eval_per_task, seed=202, exclude=train))
    write("unseen.jsonl", generate(UNSEEN, args.unseen_per_task, seed=303))
    write("general.jsonl", capitals())
