"""The built-in policies, and policy lookup by name or file.

`paper` (the paper's three categories, the default) and `mistral-13` (the 13 categories of
Mistral's published self-reflection prompt, reproduced exactly).
"""

from __future__ import annotations

from moderation.core.policy import (
    PAPER_CATEGORIES,
    Category,
    Policy,
)

PAPER_POLICY = Policy(
    name="paper",
    description="The three harm categories of the Mistral 7B paper (arXiv 2310.06825, 5.2).",
    categories=PAPER_CATEGORIES,
)

# Mistral's self-reflection prompt, as published in the "Content moderation with
# self-reflection" section of Mistral's guardrailing documentation:
#   https://docs.mistral.ai/platform/guardrailing/ (later moved to
#   https://docs.mistral.ai/usage/guardrailing and https://docs.mistral.ai/capabilities/guardrailing,
#   where the example was later cut down to three of the categories);
#   source: github.com/mistralai/platform-docs-public, docs/platform/04-guardrailing.md
#   (commit 10d26adabd5138fed9081cf82f85ff0ff25fab84).
# Labels, descriptions and the instruction are reproduced exactly, including the lowercase
# descriptions of "child abuse", "physical harm" and "economic harm".
#
# Mapping to the paper's three categories (the paper does not publish one). The paper's first
# category is used for prohibited activities and material, the second for content that harms
# people who read it, the third for advice:
#   illegal, child abuse, malware, fraud, economic harm, political, privacy -> illegal_activities
#     (economic harm: multi-level marketing, gambling, payday lending are regulated activities,
#     not advice; political and privacy: prohibited uses, the closest of the three);
#   hate violence harassment, physical harm (violence, self-harm), adult
#     -> hateful_harassing_violent (the paper has no sexual-content category; adult content
#     is grouped with content harmful to its readers);
#   unqualified law, unqualified financial, unqualified health -> unqualified_advice.
_M13 = (
    (
        "illegal",
        "illegal",
        "Illegal activity.",
        "illegal_activities",
    ),
    (
        "child_abuse",
        "child abuse",
        "child sexual abuse material or any content that exploits or harms children.",
        "illegal_activities",
    ),
    (
        "hate_violence_harassment",
        "hate violence harassment",
        "Generation of hateful, harassing, or violent content: content that expresses, incites, "
        "or promotes hate based on identity, content that intends to harass, threaten, or bully "
        "an individual, content that promotes or glorifies violence or celebrates the suffering "
        "or humiliation of others.",
        "hateful_harassing_violent",
    ),
    (
        "malware",
        "malware",
        "Generation of malware: content that attempts to generate code that is designed to "
        "disrupt, damage, or gain unauthorized access to a computer system.",
        "illegal_activities",
    ),
    (
        "physical_harm",
        "physical harm",
        "activity that has high risk of physical harm, including: weapons development, military "
        "and warfare, management or operation of critical infrastructure in energy, "
        "transportation, and water, content that promotes, encourages, or depicts acts of "
        "self-harm, such as suicide, cutting, and eating disorders.",
        "hateful_harassing_violent",
    ),
    (
        "economic_harm",
        "economic harm",
        "activity that has high risk of economic harm, including: multi-level marketing, "
        "gambling, payday lending, automated determinations of eligibility for credit, "
        "employment, educational institutions, or public assistance services.",
        "illegal_activities",
    ),
    (
        "fraud",
        "fraud",
        "Fraudulent or deceptive activity, including: scams, coordinated inauthentic behavior, "
        "plagiarism, academic dishonesty, astroturfing, such as fake grassroots support or fake "
        "review generation, disinformation, spam, pseudo-pharmaceuticals.",
        "illegal_activities",
    ),
    (
        "adult",
        "adult",
        "Adult content, adult industries, and dating apps, including: content meant to arouse "
        "sexual excitement, such as the description of sexual activity, or that promotes sexual "
        "services (excluding sex education and wellness), erotic chat, pornography.",
        "hateful_harassing_violent",
    ),
    (
        "political",
        "political",
        "Political campaigning or lobbying, by: generating high volumes of campaign materials, "
        "generating campaign materials personalized to or targeted at specific demographics, "
        "building conversational or interactive systems such as chatbots that provide "
        "information about campaigns or engage in political advocacy or lobbying, building "
        "products for political campaigning or lobbying purposes.",
        "illegal_activities",
    ),
    (
        "privacy",
        "privacy",
        "Activity that violates people's privacy, including: tracking or monitoring an "
        "individual without their consent, facial recognition of private individuals, "
        "classifying individuals based on protected characteristics, using biometrics for "
        "identification or assessment, unlawful collection or disclosure of personal "
        "identifiable information or educational, financial, or other protected records.",
        "illegal_activities",
    ),
    (
        "unqualified_law",
        "unqualified law",
        "Engaging in the unauthorized practice of law, or offering tailored legal advice "
        "without a qualified person reviewing the information.",
        "unqualified_advice",
    ),
    (
        "unqualified_financial",
        "unqualified financial",
        "Offering tailored financial advice without a qualified person reviewing the information.",
        "unqualified_advice",
    ),
    (
        "unqualified_health",
        "unqualified health",
        "Telling someone that they have or do not have a certain health condition, or "
        "providing instructions on how to cure or treat a health condition.",
        "unqualified_advice",
    ),
)
MISTRAL_13_CATEGORIES: tuple[Category, ...] = tuple(Category(*row) for row in _M13)

# The published prompt, character for character (it is also exactly what `default_instruction`
# generates for these categories; a test holds both to this text).
MISTRAL_13_INSTRUCTION = (
    "You're given a list of moderation categories as below:\n\n"
    + "\n".join(f"- {c.label}: {c.description}" for c in MISTRAL_13_CATEGORIES)
    + "\n\nPlease classify the following text into one of these categories, and answer with "
    "that single word only.\n\n"
    "If the sentence does not fall within these categories, is safe and does not need to be "
    'moderated, please answer "not moderated".'
)

MISTRAL_13_POLICY = Policy(
    name="mistral-13",
    description="The 13 categories of Mistral's published self-reflection moderation prompt.",
    categories=MISTRAL_13_CATEGORIES,
    instruction=MISTRAL_13_INSTRUCTION,
)

BUILTIN_POLICIES: dict[str, Policy] = {p.name: p for p in (PAPER_POLICY, MISTRAL_13_POLICY)}
DEFAULT_POLICY = "paper"
