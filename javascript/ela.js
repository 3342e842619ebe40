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

    const ROLE_NAMES = {"ela-entity": "entity", "ela-attribute": "attribute"};

    // A word with no letter or digit (",", "!") cannot be an entity: its chip only shows the column.
    function isWord(word) {
        return /[\p{L}\p{N}]/u.test(word);
    }

    // `answer` null: only `error`. `withRoles` false: chips without the entity/attribute marks (the
    // tokens of the prompt alone, shown beside the reason a spec was refused so it can be fixed).
    function render(tab, answer, error, withRoles = true) {
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
        if (withRoles) {
            for (const entity of answer.entities) {
                entity.columns.forEach((column) => roles.set(column, "ela-entity"));
                entity.attributes.forEach((attribute) => attribute.columns.forEach((column) => roles.set(column, "ela-attribute")));
            }
        }
        const chips = document.createElement("div");
        chips.className = "ela-chips";
        for (const word of wordsOf(answer.tokens)) {
            const chip = document.createElement("button");
            const role = roles.get(word.columns[0]);
            chip.type = "button";
            chip.className = ["ela-chip", role || ""].join(" ").trim();
            chip.textContent = word.text;
            const where = `column${word.columns.length > 1 ? "s" : ""} ${word.columns.join(", ")}`;
            const what = role ? ` (${ROLE_NAMES[role]})` : "";
            if (isWord(word.word)) {
                chip.title = `${where}${what}: click to add or remove "${word.word}" in Entities`;
                chip.addEventListener("click", () => setSpec(tab, toggleWord(specBox(tab).value, word.word.toLowerCase())));
            } else {
                chip.title = where;
                chip.disabled = true;
            }
            chips.appendChild(chip);
        }
        preview.appendChild(chips);
        for (const warning of withRoles ? answer.warnings : []) {
            const message = document.createElement("div");
            message.className = "ela-message";
            message.textContent = warning;
            preview.appendChild(message);
        }
    }

    // Answers can come back out of order: only the latest request of a tab may render.
    const latest = {};

    async function refresh(tab) {
        const prompt = promptBox(tab);
        const spec = specBox(tab);
        if (!prompt || !spec) {
            return;
        }
        const request = latest[tab] = {prompt: prompt.value, spec: spec.value};
        const current = () => latest[tab] === request;
        try {
            const answer = await requestTokens(request.prompt, request.spec);
            if (current()) {
                render(tab, answer, null);
            }
        } catch (error) {
            // A refused spec: keep the prompt's chips under the reason, so a click can fix the spec.
            let tokensOnly = null;
            if (request.spec.trim()) {
                tokensOnly = await requestTokens(request.prompt, "").catch(() => null);
            }
            if (current()) {
                render(tab, tokensOnly, error, false);
            }
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

    // Tabs wired in onUiLoaded, each with its debounced refresh.
    const scheduled = {};

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
            const later = scheduled[tab] = () => {
                clearTimeout(timer);
                timer = setTimeout(() => refresh(tab), REFRESH_DELAY_MS);
            };
            prompt.addEventListener("input", later);
            spec.addEventListener("input", later);
            button.addEventListener("click", () => detect(tab));
            refresh(tab);
        }
    });

    // Values the WebUI sets without an input event (pasted infotext, styles, "Send to"): catch up.
    onAfterUiUpdate(function() {
        for (const [tab, later] of Object.entries(scheduled)) {
            const request = latest[tab];
            const prompt = promptBox(tab);
            const spec = specBox(tab);
            if (request && prompt && spec && (request.prompt !== prompt.value || request.spec !== spec.value)) {
                later();
            }
        }
    });
})();

// The "ELA training" tab's Train button (ela_webui/training_ui.py): a task id for the WebUI's
// progress bar, as its own Train tab does (start_training_textual_inversion). Global: the button's
// _js names it.
function ela_start_training() {
    const id = randomId();
    gradioApp().getElementById("ela_train_result").innerHTML = "";
    requestProgress(id, gradioApp().getElementById("ela_train_progress"), null, function() {});
    const args = Array.from(arguments);
    args[0] = id;
    return args;
}
