"""Every PEFT method, one registration each. Importing this package registers them all with the engine.

============================  ==========================================  ===========
method                        module                                      mergeable
============================  ==========================================  ===========
``lora`` (rsLoRA, DoRA)       :mod:`peft_callbacks.methods.lora`          yes
``ia3``                       :mod:`peft_callbacks.methods.ia3`           yes
``vera``                      :mod:`peft_callbacks.methods.vera`          yes
``adalora``                   :mod:`peft_callbacks.methods.adalora`       yes
``bottleneck``                :mod:`peft_callbacks.methods.bottleneck`    no
``prompt_tuning``             :mod:`peft_callbacks.methods.prompts.soft`  no
``visual_prompts``            :mod:`peft_callbacks.methods.prompts.visual`  no
============================  ==========================================  ===========
"""

from peft_callbacks.methods import adalora, bottleneck, ia3, lora, prompts, vera  # noqa: F401  (registration)
