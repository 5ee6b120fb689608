@fixture.sqlite
Feature: A LangGraph invocation is one plan
  A graph compiled with PlanCheckpointer and wrapped in PlanGraph runs each
  invocation as one plan: the graph's state (its checkpoints, kept in the
  shop's own database) and every row its plan tools and plan nodes write are
  committed together, or not at all. A failing tool call is rolled back to
  the checkpoint taken before it; an interrupted node is rolled back, so its
  write happens once, when it runs again on resume.

  The model is a scripted chat model, so nothing goes over the network. Rows
  and checkpoints are read through a separate connection.

  Background:
    Given a shop database "shop.db" with 3 pears and 0 plums

  Scenario: An invocation that ends normally commits its state and its rows
    Given an agent graph whose model asks for "restock plum 10", then answers "done"
    When the graph is invoked on thread "t1"
    Then the invocation was released
    And "shop.db" has 3 pears and 10 plums
    And thread "t1" has a committed checkpoint in "shop.db"

  Scenario: A failing tool call is rolled back to its checkpoint, and the rest commits
    Given an agent graph whose model asks for "restock plum 10, sell pear 50", then answers "done"
    When the graph is invoked on thread "t1"
    Then the tool call "sell" was rolled back to its checkpoint
    And the invocation was released
    And "shop.db" has 3 pears and 10 plums

  Scenario: An invocation that raises keeps neither its rows nor its state
    Given an agent graph whose model asks for "restock plum 10", then fails
    When the graph is invoked on thread "t1"
    Then the invocation raised RuntimeError "the model is down"
    And the invocation was rolled back
    And "shop.db" has 3 pears and 0 plums
    And thread "t1" has no committed checkpoint in "shop.db"

  Scenario: An interrupted node is rolled back, and on resume its write happens once
    Given a graph that restocks plums, then sells a pear once a person approves
    When the graph is invoked on thread "t1"
    Then the invocation stopped at an interrupt and was released
    And "shop.db" has 3 pears and 10 plums
    When the graph is resumed on thread "t1" with "yes"
    Then the node "sell_pear" ran 2 times
    And "shop.db" has 2 pears and 10 plums
