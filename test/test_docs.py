"""Relative links of README.md and docs/*.md lead to a file and, with '#', to a heading."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
CODE = re.compile(r'^```.*?^```', re.S | re.M)


def _anchors(path: pathlib.Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as '-', repeats -1."""
    seen: dict = {}
    anchors = set()
    for match in re.finditer(r'^#{1,6} (.+)$', CODE.sub('', path.read_text()), re.M):
        slug = re.sub(r'[^\w\- ]', '', match.group(1).strip().lower()).replace(' ', '-')
        anchors.add(f'{slug}-{seen[slug]}' if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_relative_links_and_anchors_resolve():
    broken = []
    for doc in [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]:
        for link in re.findall(r'\]\(([^)\s]+)\)', CODE.sub('', doc.read_text())):
            if re.match(r'[a-z]+:', link):
                continue
            target, _, anchor = link.partition('#')
            path = (doc.parent / target) if target else doc
            if not path.exists() or (anchor and path.suffix == '.md' and
                                     anchor not in _anchors(path)):
                broken.append(f'{doc.relative_to(REPO)}: {link}')
    assert not broken, broken
