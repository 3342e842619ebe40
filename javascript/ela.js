// Entity Anchoring (ELA): the token preview under the entity spec, the "Detect from prompt"
// button and the field tooltips. The tokens come from POST /ela/v1/tokens, which tokenises with
// the loaded model exactly as generation does, so the chips show what can be anchored.
// Clicking a chip adds its word to the spec as a new entity, or removes it where it already is.

(function() {
    const TABS = ["txt2img", "img2img"];
    const REFRESH_DELAY_MS = 400;

    function elementId(tab, name) {
        return `script_${tab}_entity_anchoring_ela_${name}`;
    }

    function specBox(tab) {
        const field = gradioApp().getElementById(elementId(tab, "entities"));
        return field && field.querySelector("textarea, input");
    }

    function promptBox(tab) {
        return gradioApp().querySelector(`#${tab}_prompt textarea`);
    }

    function parseSpec(spec) {
        return spec.split("|").map((phrase) => phrase.trim().split(/\s+/).filter(Boolean)).filter((words) => words.length);
    }

    function formatSpec(phrases) {
        return phrases.map((words) => words.join(" ")).join(" | ");
    }

    // The word leaves every phrase that has it (an emptied phrase goes too), or becomes a new entity.
    function toggleWord(spec, word) {
        const phrases = parseSpec(spec);
        const present = phrases.some((words) => words.some((w) => w.toLowerCase() === word));
        if (!present) {
            return formatSpec([...phrases, [word]]);
        }
        return formatSpec(phrases.map((words) => words.filter((w) => w.toLowerCase() !== word)).filter((words) => words.length));
    }

    function setSpec(tab, spec) {
        const box = specBox(tab);
        box.value = spec;
        updateInput(box);
    }

    async function requestTokens(prompt, entities) {
        const response = await fetch("./ela/v1/tokens", {
            method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({prompt: prompt, entities: entities}),
        });
        const answer = await response.json();
        if (!response.ok) {
            throw new Error(typeof answer.detail === "string" ? answer.detail : response.statusText);
        }
        return answer;
    }

    // Consecutive BPE pieces of one word make one chip.
    function wordsOf(tokens) {
        const words = [];
        let current = null;
        for (const token of tokens) {
            if (current === null || current.text === current.word) {
                current = {word: token.word, text: "", columns: []};
                words.push(current);
            }
            current.text += token.text;
            current.columns.push(token.column);
        }
        return words;
    }

    function render(tab, answer, error) {
        const preview = gradioApp().getElementById(elementId(tab, "tokens"));
        if (!preview) {
            return;
        }
        preview.replaceChildren();
        if (error) {
            const message = document.createElement("div");
            message.className = "ela-message ela-error";
            message.textContent = error.message;
            preview.appendChild(message);
        }
        if (!answer) {
            return;
        }
        const roles = new Map();
        for (const entity of answer.entities) {
            entity.columns.forEach((column) => roles.set(column, "ela-entity"));
            entity.attributes.forEach((attribute) => attribute.columns.forEach((column) => roles.set(column, "ela-attribute")));
        }
        const chips = document.createElement("div");
        chips.className = "ela-chips";
        for (const word of wordsOf(answer.tokens)) {
            const chip = document.createElement("button");
            chip.type = "button";
            chip.className = ["ela-chip", roles.get(word.columns[0]) || ""].join(" ");
            chip.textContent = word.text;
            chip.title = `columns ${word.columns.join(", ")}: click to add or remove "${word.word}"`;
            chip.addEventListener("click", () => setSpec(tab, toggleWord(specBox(tab).value, word.word.toLowerCase())));
            chips.appendChild(chip);
        }
        preview.appendChild(chips);
        for (const warning of answer.warnings) {
            const message = document.createElement("div");
            message.className = "ela-message";
            message.textContent = warning;
            preview.appendChild(message);
        }
    }

    async function refresh(tab) {
        const prompt = promptBox(tab);
        const spec = specBox(tab);
        if (!prompt || !spec) {
            return;
        }
        try {
            render(tab, await requestTokens(prompt.value, spec.value), null);
        } catch (error) {
            render(tab, null, error);
        }
    }

    async function detect(tab) {
        try {
            setSpec(tab, (await requestTokens(promptBox(tab).value, "")).spec);
        } catch (error) {
            render(tab, null, error);
        }
    }

    function addTooltips() {
        gradioApp().querySelectorAll(".ela-help").forEach((holder) => {
            for (const [id, help] of Object.entries(JSON.parse(holder.dataset.help))) {
                const element = gradioApp().getElementById(id);
                // On the accordion, only its header: a title on the whole panel would show everywhere.
                const target = element && (element.querySelector(":scope > .label-wrap") || element);
                if (target) {
                    target.title = help;
                }
            }
        });
    }

    onUiLoaded(function() {
        addTooltips();
        for (const tab of TABS) {
            const prompt = promptBox(tab);
            const spec = specBox(tab);
            const button = gradioApp().getElementById(elementId(tab, "detect"));
            if (!prompt || !spec || !button) {
                continue;
            }
            let timer = null;
            const later = () => {
                clearTimeout(timer);
                timer = setTimeout(() => refresh(tab), REFRESH_DELAY_MS);
            };
            prompt.addEventListener("input", later);
            spec.addEventListener("input", later);
            button.addEventListener("click", () => detect(tab));
            refresh(tab);
        }
    });
})();
